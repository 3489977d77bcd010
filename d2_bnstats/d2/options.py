"""Reading layer options from the config being built, with checks that name the key."""
from .config import get_config_value


def positive_int_option(cfg, key: str, default: int) -> int:
    """``cfg[key]`` as a positive int (``default`` when there is no config or no such key); a
    ValueError naming the key and the accepted values otherwise."""
    value = get_config_value(cfg, key) if cfg is not None else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} = {value!r}: expected a positive integer")
    return value
