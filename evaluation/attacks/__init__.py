"""Adversarial attacks, batched, in torchattacks' shape: ``attack(model, x, y) -> x_adv``.

``model`` is an ``nn.Module`` on [0, 1] pixels returning logits; ``x`` is float (N, C, H, W) in [0, 1]; ``y``
holds int64 true labels. The result lies in [0, 1], has ``x``'s shape and is detached; the model runs in
eval mode during the attack and its parameters never receive gradients.

``ATTACKS`` maps a name to a factory with the usual MNIST parameters (``ATTACKS["pgd"]()``; keyword
arguments override them):

========  =========================================================================================
fgsm      FGSM(eps=0.3)
pgd       PGD(eps=0.3, alpha=0.01, steps=40, random_start=True)  (Madry et al.)
pgd-0.1   PGD(eps=0.1, alpha=0.01, steps=40, random_start=True)  (a third of the budget)
pgd-l2    PGDL2(eps=2.0, alpha=0.1, steps=50, random_start=True)  (L2 ball; normalised-gradient steps)
bim       BIM(eps=0.3, alpha=0.01, steps=40)  (no random start)
bim-early BIM(eps=0.3, alpha=0.01, steps=40, early_stop=True)  (each image frozen once misclassified)
mim       MIM(eps=0.3, alpha=eps/steps=0.03, steps=10, decay=1.0)  (Dong et al.)
cw-l2     CWL2(c=1.0 initial, kappa=0, steps=100, binary_search_steps=5, lr=0.1)
cw-linf   CWLinf(eps=0.3, alpha=0.01, steps=100, kappa=50, random_start=True)  (PGD on the CW margin loss)
cw-l0     CWL0(max_pixels=60, kappa=0, c=10, first_steps=100, steps=30, rounds=30, shrink=0.8, lr=0.1)
patch     AdversarialPatch(patch_size=12, target_class=8, steps=500, lr=0.1, batch_size=64); needs fit()
square    SquareAttack(eps=0.3, n_queries=1000, p_init=0.8)  (score-based black box, no gradients)
adaptive  AdaptivePGD(eps=0.3, alpha=0.02 cosine-decayed, steps=200, kappa=1, orthogonal steps, no random start;
          weights copy 1, pred 1, map 30, residual 1000, impulse 1; Softplus beta 50; BPDA through NLM with a
          torch NLM's gradient)  (knows the digits detector; evaluation.adaptive_sweep sweeps the map weight)
adaptive-0.1, adaptive-0.2  the same at eps 0.1 and 0.2 (alpha eps/15)
========  =========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from evaluation.attacks.adaptive import AdaptivePGD
from evaluation.attacks.base import Attack
from evaluation.attacks.bim import BIM
from evaluation.attacks.cw_l0 import CWL0
from evaluation.attacks.cw_l2 import CWL2
from evaluation.attacks.cw_linf import CWLinf
from evaluation.attacks.fgsm import FGSM
from evaluation.attacks.mim import MIM
from evaluation.attacks.patch import AdversarialPatch
from evaluation.attacks.pgd import PGD
from evaluation.attacks.pgd_l2 import PGDL2
from evaluation.attacks.square import SquareAttack

ATTACKS: dict[str, Callable[..., Attack]] = {
    "fgsm": partial(FGSM, eps=0.3),
    "pgd": partial(PGD, eps=0.3, alpha=0.01, steps=40, random_start=True),
    "pgd-0.1": partial(PGD, eps=0.1, alpha=0.01, steps=40, random_start=True),
    "pgd-l2": partial(PGDL2, eps=2.0, alpha=0.1, steps=50, random_start=True),
    "bim": partial(BIM, eps=0.3, alpha=0.01, steps=40),
    "bim-early": partial(BIM, eps=0.3, alpha=0.01, steps=40, early_stop=True),
    "mim": partial(MIM, eps=0.3, alpha=None, steps=10, decay=1.0),
    "cw-l2": partial(CWL2, c=1.0, kappa=0.0, steps=100, binary_search_steps=5, lr=0.1),
    "cw-linf": partial(CWLinf, eps=0.3, alpha=0.01, steps=100, kappa=50.0, random_start=True),
    "cw-l0": partial(CWL0, max_pixels=60, kappa=0.0, c=10.0, first_steps=100, steps=30, rounds=30, shrink=0.8),
    "patch": partial(AdversarialPatch, patch_size=12, target_class=8, steps=500, lr=0.1, batch_size=64),
    "square": partial(SquareAttack, eps=0.3, n_queries=1000, p_init=0.8),
    "adaptive": partial(AdaptivePGD, eps=0.3, alpha=0.02, steps=200, random_start=False, kappa=1.0, copy_weight=1.0,
                        pred_weight=1.0, map_weight=30.0, residual_weight=1000.0, impulse_weight=1.0,
                        softplus_beta=50.0),
}
for _eps in (0.1, 0.2):
    ATTACKS[f"adaptive-{_eps:g}"] = partial(ATTACKS["adaptive"], eps=_eps, alpha=_eps / 15)
ADAPTIVE_ATTACKS = tuple(name for name in ATTACKS if name.split("-")[0] == "adaptive")

__all__ = [
    "ADAPTIVE_ATTACKS", "ATTACKS", "AdaptivePGD", "BIM", "CWL0", "CWL2", "FGSM", "MIM", "PGD", "PGDL2",
    "AdversarialPatch", "Attack", "CWLinf", "SquareAttack",
]
