"""What other packages add to the ``explainer`` command line, found through the ``explainer.plugins`` entry points.

The product's CLI (:mod:`worker.cli`) holds the commands that run the product; a package that measures or feeds
it (this distribution's evaluation harness, or a user's) declares in its own metadata::

    [project.entry-points."explainer.plugins"]
    evaluation = "evaluation.cli:register"

and ``register(plugins)`` adds to the :class:`Plugins` it is given: commands (``evaluate``, ``bench``, ``demo``),
attacks that ``explainer feed --attack`` can make adversarials with, and the reference clean images ``explainer
calibrate`` uses for a built-in model when no ``--images-dir`` is given. The product never imports the harness:
the arrow runs from the plugin to the product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points

import numpy as np

GROUP = "explainer.plugins"


@dataclass
class Plugins:
    """``commands``: functions that add commands to the Typer app; ``attacks``: name -> ``attack(images,
    labels)`` on uint8 digits (N, H, W), returning uint8 adversarials of the same shape; ``reference_images``:
    ``(model, n) -> (images, description)``, a built-in model's clean calibration images."""

    commands: list[Callable] = field(default_factory=list)
    attacks: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = field(default_factory=dict)
    reference_images: Callable[[str, int | None], tuple[object, str]] | None = None


@cache
def load_plugins() -> Plugins:
    """Every installed plugin, registered once per process in entry-point order."""
    plugins = Plugins()
    for point in entry_points(group=GROUP):
        point.load()(plugins)
    return plugins
