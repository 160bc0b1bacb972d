"""The sample contract: validator and collate (batch convention)."""

from __future__ import annotations

import pytest
import torch

from densemtl.data.geometry import make_intrinsics
from densemtl.data.sample import SampleError, collate, validate_sample


def _sample(h=4, w=5, sid="s0", **drop):
    normals = torch.zeros(3, h, w)
    normals[2] = -1.0
    s = {
        "image": torch.rand(3, h, w),
        "semseg": torch.randint(0, 3, (h, w)),
        "depth": torch.rand(1, h, w) + 0.5,
        "normals": normals,
        "edges": (torch.rand(1, h, w) > 0.5).float(),
        "K": make_intrinsics(5.0, 5.0, 2.0, 1.5),
        "id": sid,
    }
    for k in drop:
        del s[k]
    return s


def test_valid_sample_passes():
    validate_sample(_sample(), num_classes=3, full=True)
    validate_sample(_sample(semseg=1, depth=1, normals=1, edges=1), full=True)  # labels optional


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("semseg", torch.zeros(4, 5, dtype=torch.int32), "int64"),
        ("depth", torch.zeros(4, 5), r"shape \(4, 5\)"),
        ("normals", torch.zeros(3, 4, 6), "shape"),
        ("K", torch.eye(3, dtype=torch.float64), "float32"),
        ("id", 3, "'id' must be str"),
    ],
)
def test_cheap_checks_name_the_sample(key, value, match):
    s = _sample(sid="room_7")
    s[key] = value
    with pytest.raises(SampleError, match=match) as info:
        validate_sample(s, full=False)
    assert "room_7" in str(info.value) or key == "id"


def test_value_checks():
    s = _sample()
    s["semseg"][0, 0] = 3
    with pytest.raises(SampleError, match=r"ids \[3\]"):
        validate_sample(s, num_classes=3)
    s["semseg"][0, 0] = 255  # ignore is fine
    validate_sample(s, num_classes=3)
    s = _sample()
    s["depth"][0, 1, 1] = float("nan")
    with pytest.raises(SampleError, match="depth"):
        validate_sample(s)
    validate_sample(s, full=False)  # the cheap mode does not look at values
    s = _sample()
    s["normals"][:, 0, 0] = torch.tensor([0.5, 0.0, 0.0])
    with pytest.raises(SampleError, match="unit"):
        validate_sample(s)
    s["normals"][:, 0, 0] = 0.0  # 0-vector = invalid, allowed
    validate_sample(s)
    s = _sample()
    s["edges"][0, 0, 0] = 0.5
    with pytest.raises(SampleError, match="edges"):
        validate_sample(s)
    s = _sample()
    s["image"][0, 0, 0] = 1.5
    with pytest.raises(SampleError, match="image"):
        validate_sample(s)


def test_collate_fills_absent_labels_and_flags_them():
    a = _sample(sid="a")
    b = _sample(sid="b", depth=1, normals=1)
    c = _sample(sid="c", semseg=1, edges=1)
    batch = collate([a, b, c])
    assert batch["id"] == ["a", "b", "c"]
    assert batch["image"].shape == (3, 3, 4, 5)
    assert batch["K"].shape == (3, 3, 3)
    assert batch["has_semseg"].tolist() == [True, True, False]
    assert batch["has_depth"].tolist() == [True, False, True]
    assert batch["has_normals"].tolist() == [True, False, True]
    assert batch["has_edges"].tolist() == [True, True, False]
    assert batch["semseg"].dtype == torch.int64 and (batch["semseg"][2] == 255).all()
    assert torch.equal(batch["semseg"][0], a["semseg"])
    assert (batch["depth"][1] == 0).all() and torch.equal(batch["depth"][2], c["depth"])
    assert (batch["normals"][1] == 0).all() and batch["normals"].shape == (3, 3, 4, 5)
    assert (batch["edges"][2] == 0).all() and batch["edges"].shape == (3, 1, 4, 5)


def test_collate_omits_tasks_nobody_has_and_refuses_mixed_sizes_or_K():
    batch = collate([_sample(depth=1), _sample(depth=1)])
    assert "depth" not in batch and "has_depth" not in batch
    with pytest.raises(SampleError, match="different sizes"):
        collate([_sample(4, 5), _sample(4, 6)])
    with pytest.raises(SampleError, match="intrinsics"):
        collate([_sample(sid="x"), _sample(sid="y", K=1)])
    assert "K" not in collate([_sample(K=1), _sample(K=1)])
