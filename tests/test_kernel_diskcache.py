"""Host kernels are cached on disk by the hash of their code: reused when equal, rebuilt when damaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeattn.config import AttentionConfig
from edgeattn.kernels_tvm import diskcache, registry


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEATTN_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGEATTN_KERNEL_CACHE_DIR", raising=False)  # tests/conftest.py shares one otherwise
    registry.clear_cache()
    yield tmp_path / "kernels"
    registry.clear_cache()


def test_second_compile_loads_the_cached_library_without_building_the_ir(kernel_cache) -> None:
    """The key comes before the IR: a cached library loads without parsing TVMScript (~1 s a kernel)."""
    from edgeattn.kernels_tvm.abi import OP_DENSE

    q, k, v = torch.randn(1, 4, 150, 32), torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32)
    cfg = AttentionConfig(kind="dense")
    first = registry.run_layer(q, k, v, cfg, window=40)
    files = sorted(kernel_cache.glob("*.so"))
    assert len(files) == 1
    registry.clear_cache()
    again = registry.run_layer(q, k, v, cfg, window=40)
    assert sorted(kernel_cache.glob("*.so")) == files  # loaded, not rebuilt under a new name
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    loaded = registry.get_kernel(OP_DENSE, heads_q=4, heads_kv=2, head_dim=32, window=40)  # the one run_layer used
    assert loaded._mod is None and loaded.lib is not None
    assert loaded.symbol in [gv.name_hint for gv in loaded.mod.get_global_vars()]  # built when asked for
    # another spec is another key
    other = registry.make_spec(OP_DENSE, heads_q=4, heads_kv=2, head_dim=32, window=41)
    assert diskcache.key_of((other.key(), loaded.schedule), loaded.target) != diskcache.key_of(
        (loaded.spec.key(), loaded.schedule), loaded.target
    )


def test_a_damaged_library_is_rebuilt(kernel_cache) -> None:
    """Never trusted, never fatal: a garbage file under the right key is replaced by a fresh build."""
    from edgeattn.kernels_tvm.abi import OP_DENSE

    kw = dict(heads_q=2, heads_kv=1, head_dim=32, window=24)
    ref = registry.get_kernel(OP_DENSE, compile=False, **kw)
    path = kernel_cache / f"{diskcache.key_of((ref.spec.key(), ref.schedule), ref.target)}.so"
    kernel_cache.mkdir(parents=True)
    path.write_bytes(b"\x7fELF garbage")
    kern = registry.get_kernel(OP_DENSE, **kw)
    q, k, v = torch.randn(2, 70, 32), torch.randn(1, 70, 32), torch.randn(1, 70, 32)
    out = registry.empty((2, 70, 32))
    kern(q, k, v, out)
    assert path.stat().st_size > 1000 and torch.isfinite(out).all()


def test_cross_targets_and_opt_out_are_not_cached(kernel_cache, monkeypatch) -> None:
    import tvm

    assert not diskcache.cacheable(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert diskcache.cacheable(registry.host_target())
    monkeypatch.setenv("EDGEATTN_KERNEL_CACHE_DIR", str(kernel_cache.parent / "shared"))
    assert diskcache.cache_dir() == kernel_cache.parent / "shared"
    monkeypatch.setenv("EDGEATTN_KERNEL_CACHE", "0")
    assert diskcache.cache_dir() is None
