"""The CUDA code paths, checked without a GPU (issue #42): every command refuses `--device cuda` with one line
and exit 2 before it loads a model when there is no CUDA; the memory probes read the CUDA allocator's free
memory when given a CUDA device; torchrun ranks get NCCL on a GPU and gloo on the CPU, each on the GPU of
its LOCAL_RANK; `bench` synchronises CUDA around every timed region. (On a GPU, benchmarks/gpu_check.py.)"""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import DeviceError, PlanError


def _no_loading(monkeypatch):
    """Every model loader of the jobs fails the test if it is reached."""
    import prunekit.engine.streamed as streamed
    import prunekit.evaluation.compare as compare
    import prunekit.jobs.common as common
    import prunekit.jobs.evaluate as evaluate
    import prunekit.jobs.heal as heal

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the device was checked")

    for mod in (common, evaluate, heal, compare):
        monkeypatch.setattr(mod, "load_model", boom)
    monkeypatch.setattr(common, "StreamedLayers", boom)
    monkeypatch.setattr(streamed.StreamedLayers, "__init__", boom)


def _commands(ck, text, tmp):
    calib = ["--calib", str(text), "--samples", "2", "--seq-len", "24"]
    return {
        "score": ["score", str(ck), *calib, "--json", str(tmp / "s.json")],
        "drop": ["drop", str(ck), "--target", "attn", "--n", "1", *calib, "--out", str(tmp / "d")],
        "width": ["width", str(ck), "--mlp-keep", "0.5", *calib, "--out", str(tmp / "w")],
        "compress": ["compress", str(ck), "--budget", "params=0.8", *calib, "--out", str(tmp / "c")],
        "heal": ["heal", str(ck), "--steps", "1", "--text", str(text), "--out", str(tmp / "h")],
        "eval": ["eval", str(ck), "--text", str(text), "--json", str(tmp / "e.json")],
        "bench": ["bench", str(ck)],
        "compare": ["compare", str(ck), str(ck), "--out", str(tmp / "r")],
    }


@pytest.mark.parametrize("cmd", ["score", "drop", "width", "compress", "heal", "eval", "bench", "compare"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_every_command_refuses_cuda_without_it_before_loading(tiny_checkpoint, tmp_path, monkeypatch, capsys, cmd,
                                                              device):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_loading(monkeypatch)
    out = tmp_path / "outputs"
    out.mkdir()
    assert main(["-q", *_commands(ck, text, out)[cmd], "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is available" in err[0], err
    assert list(out.iterdir()) == []  # nothing written


def test_a_recipe_with_a_cuda_stage_is_refused_before_its_first_stage(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from prunekit.cli import main

    ck, text = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_loading(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n- command: drop\n  options: {{model: {ck}, target: attn, n: 1, calib: {text}, "
                      "samples: 2, seq_len: 24}\n- command: heal\n  options: {steps: 1, device: cuda}\n")
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_job_functions_refuse_cuda_without_it(tiny_checkpoint, tmp_path, monkeypatch):
    from prunekit.jobs import bench_job, compress_job, eval_job, heal_checkpoint, score_job

    ck, text = tiny_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_loading(monkeypatch)
    calls = [
        lambda: score_job(str(ck), calib=str(text), samples=2, seq_len=24, device="cuda"),
        lambda: compress_job(str(ck), tmp_path / "c", budget="params=0.8", calib=str(text), samples=2, seq_len=24,
                             device="cuda"),
        lambda: heal_checkpoint(str(ck), str(tmp_path / "h"), text=str(text), steps=1, device="cuda"),
        lambda: eval_job(str(ck), text=str(text), device="cuda"),
        lambda: bench_job(str(ck), device="cuda"),
    ]
    for call in calls:
        with pytest.raises(DeviceError, match="no CUDA device"):
            call()


# --- devices under torchrun ------------------------------------------------------------------------------------

def _two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cuda_maps_to_the_local_rank_under_torchrun(monkeypatch):
    from prunekit.jobs.dist import DistEnv, resolve_device

    _two_gpus(monkeypatch)
    rank1 = DistEnv(rank=1, world_size=2, local_rank=1)
    assert resolve_device("cuda", rank1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", rank1) == torch.device("cuda", 1)
    assert resolve_device("cpu", rank1) == torch.device("cpu")
    with pytest.raises(DeviceError, match="LOCAL_RANK"):  # both ranks on GPU 0 would be refused by NCCL later
        resolve_device("cuda:0", rank1)
    assert resolve_device("cuda:1", DistEnv()) == torch.device("cuda", 1)  # one process: the GPU asked for
    assert resolve_device("cuda", DistEnv()) == torch.device("cuda")
    with pytest.raises(DeviceError, match="only 2 CUDA device"):  # a third process on a two-GPU machine
        resolve_device("cuda", DistEnv(rank=2, world_size=3, local_rank=2))


@pytest.mark.parametrize(("device", "backend"), [("cuda:1", "nccl"), ("cpu", "gloo")])
def test_torchrun_uses_nccl_on_a_gpu_and_gloo_on_the_cpu(monkeypatch, device, backend):
    import prunekit.jobs.dist as dist_mod

    _two_gpus(monkeypatch)
    seen: list = []
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend: seen.append(("init", backend)))
    monkeypatch.setattr(dist_mod.dist, "destroy_process_group", lambda: seen.append(("destroy",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(("set_device", str(d))))
    env = dist_mod.DistEnv(rank=1, world_size=2, local_rank=1)
    with dist_mod.process_group(env, dist_mod.resolve_device(device, env)):
        pass
    want = [("set_device", "cuda:1")] if backend == "nccl" else []
    assert seen == [*want, ("init", backend), ("destroy",)]


def test_all_reduce_runs_on_the_gpu_with_nccl_and_returns_cpu_float64(monkeypatch):
    import prunekit.jobs.dist as dist_mod

    moved: list = []
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):  # record where the collective's tensor is sent; stay on the CPU
        moved.append(args[0] if args else kwargs.get("device"))
        return real_to(self, torch.float64) if any(a is torch.float64 for a in args) else real_to(self, *args[1:])

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(dist_mod.dist, "all_reduce", lambda t, op: t.mul_(2))
    out = dist_mod.all_reduce_sum(torch.tensor([1.0, 2.0]), torch.device("cuda", 1))
    monkeypatch.undo()
    assert moved[0] == torch.device("cuda", 1)
    assert out.dtype == torch.float64 and out.device.type == "cpu" and out.tolist() == [2.0, 4.0]


# --- device memory ---------------------------------------------------------------------------------------------

def test_device_free_memory_is_the_cuda_allocators(monkeypatch):
    from prunekit.engine import memory

    asked: list = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (asked.append(d), (123 << 20, 80 << 30))[1])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 50)  # the host's: not what is used
    assert memory.device_free_bytes(torch.device("cuda", 1)) == 123 << 20
    assert asked == [torch.device("cuda", 1)]
    assert memory.device_free_bytes(torch.device("cpu")) == 1 << 50
    # Blocks the caching allocator keeps after tensors were freed are this process's to reuse.
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2 << 30)
    assert memory.device_free_bytes(torch.device("cuda", 1)) == (123 << 20) + (3 << 30)


def test_should_stream_compares_the_weights_with_the_gpus_free_memory(tiny_checkpoint, monkeypatch):
    from prunekit.engine import memory

    ck, _ = tiny_checkpoint
    need = int(memory.checkpoint_bytes(ck, "float32") * memory.STREAM_HEADROOM)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1 << 50)
    for free, streamed in ((need, False), (need - 1, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None, free=free: (free, 80 << 30))
        assert memory.should_stream(ck, "float32", "cuda") is streamed
        assert memory.should_stream(ck, "float32", "cpu") is False  # the host has plenty


def test_compress_preflight_checks_the_gpus_free_memory(tiny_checkpoint, monkeypatch):
    """On a GPU the device must hold the weights (or one layer, streamed), the candidates' projections, one
    sequence's logits and one layer's float64 statistics; the host the statistics and the layer inputs."""
    from prunekit.adapters import get_adapter
    from prunekit.compress.memory import memory_estimate
    from prunekit.engine.memory import STREAM_HEADROOM, checkpoint_bytes
    from prunekit.io.checkpoint import build_skeleton
    from prunekit.jobs import compress as job

    ck, _ = tiny_checkpoint
    gpu = torch.device("cuda")
    est = memory_estimate(get_adapter(build_skeleton(ck, "float32")), 8, 24)
    # One layer's float64 Grams and Fishers: o_proj 64 -> 64 and down_proj 128 -> 64 of the tiny Llama.
    assert est["layer_stats"] == 8 * (64 ** 2 + 64 ** 2) + 8 * (128 ** 2 + 64 ** 2)
    common = est["weights"] + est["logits"] + est["layer_stats"]
    in_memory = int(checkpoint_bytes(ck) * STREAM_HEADROOM) + common
    streamed = est["layer"] + est["head"] + common
    monkeypatch.setattr(job, "available_memory_bytes", lambda: 1 << 50)
    for free, expected in ((in_memory, False), (in_memory - 1, True), (streamed, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None, free=free: (free, 80 << 30))
        assert job.compress_memory(ck, "float32", gpu, 8, 24, None) is expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (streamed - 1, 80 << 30))
    with pytest.raises(PlanError, match="of cuda memory"):
        job.compress_memory(ck, "float32", gpu, 8, 24, None)
    # The host's memory does not count the device's share.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1 << 50, 80 << 30))
    host = est["fishers"] + est["largest_gram"] + est["states"]
    monkeypatch.setattr(job, "available_memory_bytes", lambda: host)
    assert job.compress_memory(ck, "float32", gpu, 8, 24, None) is False


# --- bench ------------------------------------------------------------------------------------------------------

def test_bench_synchronises_cuda(monkeypatch):
    from prunekit.evaluation import bench

    synced: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(d))
    bench._synchronizer(torch.device("cuda", 1))()
    assert synced == [torch.device("cuda", 1)]


def test_bench_synchronises_around_every_timed_region(monkeypatch):
    from conftest import tiny_model

    from prunekit.evaluation import bench

    calls: list = []
    monkeypatch.setattr(bench, "_synchronizer", lambda device: lambda: calls.append(str(device)))
    bench.benchmark(tiny_model(), contexts=(8, 16), new_tokens=2, repeats=2, warmup=1, progress=False)
    # Before and after the prefill and the decode of every run: 2 contexts x (1 warm-up + 2 timed) runs.
    assert calls == ["cpu"] * (4 * 2 * 3)
