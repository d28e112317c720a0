"""Capture and restore every random number generator training touches.

States are stored as tensors and plain types so a checkpoint holding them still loads with
``torch.load(weights_only=True)`` (a raw numpy RNG state would not).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The current python, numpy, torch CPU and (when present) CUDA generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert not isinstance(keys, str)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set every generator to ``state`` as returned by :func:`capture`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the generators whose states differ between two :func:`capture` results."""
    pa, pb, na, nb = a["python"], b["python"], a["numpy"], b["numpy"]
    ca, cb = a.get("cuda", []), b.get("cuda", [])
    same = {
        "python": (pa["version"], pa["gauss"]) == (pb["version"], pb["gauss"])
        and torch.equal(pa["state"], pb["state"]),
        "numpy": all(na[k] == nb[k] for k in ("kind", "pos", "has_gauss", "cached"))
        and torch.equal(na["keys"], nb["keys"]),
        "torch": torch.equal(a["torch"], b["torch"]),
        "cuda": len(ca) == len(cb) and all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True)),
    }
    return [name for name, equal in same.items() if not equal]
