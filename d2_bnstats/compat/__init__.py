"""Compatibility pieces for the detectron2 versions the plug-in supports."""
