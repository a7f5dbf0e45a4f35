"""The autotune layer: one config under the interpreter, the on-disk cache across processes,
sequence length never part of a key."""

from __future__ import annotations

import json

import pytest
import torch

from subquad.autotune import Config, Tuner, spaces, tuner as tuner_mod


class FakeCuda:
    type = "cuda"


def test_interpreter_uses_default_without_timing():
    t = Tuner("t-interp", [Config({"BV": 32}), Config({"BV": 64})])
    called = []
    cfg = t.choose(("float16", 64, 64, True), FakeCuda(), lambda c: called.append(c) or 1.0)
    assert cfg == Config({"BV": 32}) and not called


def test_first_configs_lead_for_their_dtype_only():
    """``first`` puts configs before the space for buckets of one dtype (fp32's defaults differ from
    fp16's, which spill for it); other dtypes keep the space's order; the valid filter still holds;
    ``configs()`` lists every config some bucket may run (the per-config tests walk it)."""
    small, big, huge = Config({"BV": 16}), Config({"BV": 64}), Config({"BV": 256})
    t = Tuner("t-first", [big, Config({"BV": 32}), huge], lambda c, b: c.kw["BV"] <= b[1],
              first={"float32": [huge, small]})
    assert t.default(("float16", 128)) == big
    assert t.default(("float32", 128)) == small  # huge is not valid at 128
    assert t.candidates(("float32", 512)) == [huge, small, big, Config({"BV": 32})]
    assert t.candidates(("tf32", 512))[0] == big
    assert t.configs() == [huge, small, big, Config({"BV": 32})]


def test_disk_cache_is_reused_by_a_new_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "FakeGPU|triton-x")
    Tuner.forget_memory()
    space = [Config({"BV": 32}), Config({"BV": 64}, num_warps=8), Config({"BV": 128})]
    times = {32: 2.0, 64: 1.0, 128: 3.0}
    calls = []

    def bench(cfg):
        calls.append(cfg)
        if cfg.kw["BV"] == 128:
            raise RuntimeError("out of shared memory")  # a failing config is skipped, not fatal
        return times[cfg.kw["BV"]]

    cfg = Tuner("t-disk", space).choose(("bfloat16", 128, 128, True), FakeCuda(), bench)
    assert cfg == space[1] and len(calls) == 3
    data = json.loads((tmp_path / "autotune.json").read_text())
    (key,) = data
    assert key == "FakeGPU|triton-x|t-disk|bfloat16-128-128-True"
    assert data[key]["config"] == space[1].to_json()
    assert data[key]["ms"]["BV128_w4_s2"].startswith("failed")

    Tuner.forget_memory()  # a second process: reads the file, times nothing
    calls.clear()
    cfg2 = Tuner("t-disk", space).choose(("bfloat16", 128, 128, True), FakeCuda(), bench)
    assert cfg2 == space[1] and not calls
    Tuner.forget_memory()


class FakeCuda1:
    type = "cuda"
    index = 1


@pytest.mark.parametrize("content", ["[]", "null", "5", '"x"', '{"K": 5}', '{"K": {"config": 5}}',
                                     '{"K": {"config": {"kw": {"BV": 999}, "num_warps": 4, "num_stages": 2}}}'])
def test_a_cache_of_another_shape_is_tuned_over(tmp_path, monkeypatch, content):
    """Valid JSON that is not a cache (a list, a number), a malformed entry, or a config the space no
    longer holds for the bucket: tuned again, never an exception out of the op's call."""
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "G")
    key = "G|t-shape|x"
    (tmp_path / "autotune.json").write_text(content.replace('"K"', f'"{key}"'))
    Tuner.forget_memory()
    space = [Config({"BV": 32}), Config({"BV": 64})]
    calls = []
    cfg = Tuner("t-shape", space).choose(("x",), FakeCuda(), lambda c: calls.append(c) or c.kw["BV"])
    assert cfg == space[0] and len(calls) == 2
    assert json.loads((tmp_path / "autotune.json").read_text())[key]["config"] == space[0].to_json()
    Tuner.forget_memory()


def test_memo_is_per_device(tmp_path, monkeypatch):
    """Two GPUs of one process (a model spread over devices) each get their own choice: the one
    timed on cuda:0 is not reused on cuda:1 unlooked (the disk key names the GPU)."""
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: f"GPU{getattr(device, 'index', 0)}")
    Tuner.forget_memory()
    space = [Config({"BV": 32}), Config({"BV": 64})]
    t = Tuner("t-devices", space)
    assert t.choose(("x",), FakeCuda(), lambda c: c.kw["BV"]) == space[0]
    assert t.choose(("x",), FakeCuda1(), lambda c: -c.kw["BV"]) == space[1]
    assert t.choose(("x",), FakeCuda(), lambda c: 1 / 0) == space[0]  # memoised per device
    # what a benchmark reads back: the choice per device, None where the kernel has not run
    assert t.chosen(("x",), FakeCuda()) == space[0] and t.chosen(("x",), FakeCuda1()) == space[1]
    assert t.chosen(("y",), FakeCuda()) is None
    Tuner.forget_memory()


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False),
                                      ("off", False), ("no", False), ("", False)])
def test_env_flags_read_as_triton_reads_them(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert tuner_mod.interpreting() is on
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("SUBQUAD_AUTOTUNE", value)
    assert tuner_mod._tuning_enabled() is on


def test_every_config_fails_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "FakeGPU")
    Tuner.forget_memory()

    def bench(cfg):
        raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="every config"):
        Tuner("t-fail", [Config({"BV": 32})]).choose(("x",), FakeCuda(), bench)
    Tuner.forget_memory()


def test_spilling_configs_compete_on_time(monkeypatch, tmp_path):
    """A spill outside the main loop costs nothing per step, one inside shows in the time: the
    tuner takes the fastest config, spilling or not, and notes the spill in the cache."""
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "FakeGPU")
    Tuner.forget_memory()
    space = [Config({"BV": 16}), Config({"BV": 32}), Config({"BV": 64})]
    spill_ms = {16: 3.0, 32: 1.0}

    def bench(cfg):
        bv = cfg.kw["BV"]
        if bv in spill_ms:
            raise tuner_mod.Spilled(spill_ms[bv])
        return clean_ms

    clean_ms = 0.5  # the clean config is fastest
    assert Tuner("t-spill", space).choose(("a",), FakeCuda(), bench) == space[2]
    clean_ms = 5.0  # a spilling config is faster: its time decides
    assert Tuner("t-spill", space).choose(("b",), FakeCuda(), bench) == space[1]
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["FakeGPU|t-spill|b"]["ms"]["BV32_w4_s2"].startswith("spills")
    assert data["FakeGPU|t-spill|b"]["ms"]["BV64_w4_s2"] == 5.0
    Tuner.forget_memory()


def test_no_timing_inside_a_cuda_graph_capture(monkeypatch, tmp_path):
    """Timing syncs, which breaks a CUDA graph capture: a bucket first met inside one (a shape its
    warm-up did not run) takes the default, untimed and not stored; a cached choice still holds."""
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "FakeGPU")
    Tuner.forget_memory()
    space = [Config({"BV": 16}), Config({"BV": 32})]
    t = Tuner("t-capture", space)
    assert t.choose(("tuned",), FakeCuda(), lambda c: c.kw["BV"] == 16) == space[1]  # before the capture
    monkeypatch.setattr(tuner_mod, "_capturing", lambda: True)
    t2 = Tuner("t-capture", space)  # a new process's tuner: nothing memoised, the cache file holds "tuned"

    def bench(cfg):
        raise AssertionError("timed inside a capture")

    assert t2.choose(("tuned",), FakeCuda(), bench) == space[1]
    assert t2.choose(("new",), FakeCuda(), bench) == space[0]
    monkeypatch.setattr(tuner_mod, "_capturing", lambda: False)
    assert t2.choose(("new",), FakeCuda(), lambda c: c.kw["BV"] == 16) == space[1]  # tuned after all
    Tuner.forget_memory()


def test_lightning_varlen_length_inside_a_capture(monkeypatch):
    """The recurrent-or-chunked choice reads the longest packed sequence (a host sync); inside a
    CUDA graph capture it takes what the warm-up read from the same cu_seqlens, else T."""
    from subquad.kernels import lightning as kl

    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    assert kl._max_len(12, cu) == 7
    monkeypatch.setattr(kl, "capturing", lambda t: True)
    assert kl._max_len(12, cu) == 7
    assert kl._max_len(12, cu.clone()) == 12


@pytest.mark.parametrize("tuner", spaces.LIGHTNING, ids=lambda t: t.kernel)
@pytest.mark.parametrize("K,V", [(16, 16), (64, 64), (100, 40), (128, 128), (256, 256)])
def test_every_lightning_space_has_a_default_for_supported_head_dims(tuner, K, V):
    cfg = tuner.default(("bfloat16", K, V, True))
    assert cfg in tuner.space


@pytest.mark.parametrize("tuner", spaces.NEIGHBORHOOD, ids=lambda t: t.kernel)
@pytest.mark.parametrize("D", [16, 32, 64, 100, 128, 256])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_neighborhood_space_has_a_default(tuner, D, rank):
    cfg = tuner.default(("bfloat16", D, rank))
    assert cfg.kw["R"] == rank


def test_sequence_length_is_not_a_specialization_key():
    """T is a runtime argument excluded from specialization, and launchers' buckets have no T."""
    import inspect

    from subquad.kernels import lightning as kl

    for fn in (kl._fwd_kernel, kl._recurrent_fwd_kernel, kl._bwd_dq_kernel, kl._bwd_dkdv_kernel):
        # JITFunction on a GPU; the interpreter's wrapper keeps the jit keyword arguments
        dns = fn.do_not_specialize if hasattr(fn, "do_not_specialize") else fn.kwargs["do_not_specialize"]
        assert list(dns) == ["T"] or [getattr(p, "name", p) for p in dns] == ["T"]
    src = inspect.getsource(kl._bucket)
    assert "T" not in src.split("return", 1)[1]


def test_cache_key_names_the_kernel_code():
    """A choice timed on other kernel code is stale: the key carries a digest of kernels/*.py."""
    tag = tuner_mod._device_tag(torch.device("cpu"))
    digest = tag.split("|kernels-")[1]
    assert len(digest) == 10 and int(digest, 16) >= 0 and digest == tuner_mod._code_tag()


def test_code_tag_digests_the_kernels_source(tmp_path, monkeypatch):
    """A cached choice is keyed by a digest of the kernels' source: editing a kernel file changes
    it (a choice timed on other kernel code is not reused); files other than .py do not."""
    from subquad.autotune import tuner as tuner_mod
    (tmp_path / "autotune").mkdir()
    kd = tmp_path / "kernels"
    kd.mkdir()
    (kd / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(tuner_mod, "__file__", str(tmp_path / "autotune" / "tuner.py"))
    tag = tuner_mod._code_tag.__wrapped__
    t1 = tag()
    (kd / "a.py").write_text("x = 2\n")
    t2 = tag()
    assert t1 != t2
    (kd / "notes.txt").write_text("not a kernel")
    assert tag() == t2


def test_forget_choices_looks_again(tmp_path, monkeypatch):
    """Defaults chosen while tuning was off are dropped by forget_choices: the next choose times."""
    from subquad.autotune import tuner as tuner_mod
    from subquad.autotune.tuner import Config, Tuner
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner_mod, "_device_tag", lambda device: "G")
    Tuner.forget_memory()
    space = [Config({"BV": 32}), Config({"BV": 64})]
    t = Tuner("t-forget", space)
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: False)
    assert t.choose(("x",), FakeCuda(), lambda c: 1 / 0) == space[0]
    monkeypatch.setattr(tuner_mod, "_tuning_enabled", lambda: True)
    assert t.choose(("x",), FakeCuda(), lambda c: -c.kw["BV"]) == space[0]  # memoised
    t.forget_choices()
    assert t.choose(("x",), FakeCuda(), lambda c: -c.kw["BV"]) == space[1]
    Tuner.forget_memory()
