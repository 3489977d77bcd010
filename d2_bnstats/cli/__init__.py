"""The plug-in's commands, installed as console commands with the package and wrapped by the scripts of
a clone's ``tools/`` (which also register the lab's data sets):

=================================  ====================================  =========================================
command                            clone script                          module
=================================  ====================================  =========================================
``d2-bnstats-train``               ``tools/train_net.py``                :mod:`d2_bnstats.cli.train`
``d2-bnstats-lazy-train``          ``tools/lazyconfig_train_net.py``     :mod:`d2_bnstats.cli.lazy_train`
``d2-bnstats-compare``             ``tools/compare_bn_stats.py``         :mod:`d2_bnstats.cli.compare`
``d2-bnstats-estimate-evalnorm``   ``tools/estimate_evalnorm.py``        :mod:`d2_bnstats.cli.estimate_evalnorm`
``d2-bnstats-convert-mabn``        ``tools/convert_to_mabn.py``          :mod:`d2_bnstats.cli.convert_mabn`
``d2-bnstats-deploy``              ``tools/deploy_model.py``             :mod:`d2_bnstats.cli.deploy`
=================================  ====================================  =========================================

Every one parses its command line with :class:`d2_bnstats.cli.args.ToolArgumentParser`: flags and
config overrides in any order, ``bnstats://NAME`` accepted as a config file. Each module's ``main(argv)``
does the work (returning what the tool computed) and ``command()`` is the console entry point (an
exit status).
"""
