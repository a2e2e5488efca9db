"""raysegtrain: semantic-segmentation training on Ray Train, searched with Ray Tune, tracked in MLflow."""

import os as _os

# No network at run time: Albumentations would otherwise ask PyPI for its latest version on import (in every worker).
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .config import Config, load as load_config  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["Config", "load_config", "fit", "__version__"]


def fit(config, **kwargs):
    """`raysegtrain fit` as a function: Ray Train workers run the shared loop; see `raysegtrain.train.fit`."""
    from .train import fit as _fit

    return _fit(config, **kwargs)
