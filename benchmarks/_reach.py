"""Which Triton specialisations the package's dispatchers reach: a grid of real calls through the public ops, recorded.

Each call goes through the public entry point (`lora_linear` forward and backward, `lora_linear_multi`,
`augment_mix`, `soft_label_loss` with backend="triton") on CPU tensors, in a worker process where the
stand-in driver of benchmarks/_triton_aot.py is active: the launchers choose their rules and bind their
arguments exactly as on a GPU of that architecture, and every launch is recorded with its specialisation
(Triton's own cache key: constexprs, argument types, 16-divisibility and ==1 of integers and pointers,
options). Nothing executes. A launch whose specialisation is not among `known` is compiled right there
(gpu_static.py) or only reported (the test), so "reached" can be compared with "compiled".

The grid: the heads of the models with presets (CLIP RN50 1024-d and ViT-B 512-d embeddings at 10, 100,
365, 1,000 and 21,843 classes; the digits run's 64-d tiny CLIP at 10), ViT-B's MLP (768 <-> 3072, where
N and K are multiples of 16 and the input gradient runs the aligned rules), odd sizes (45 -> 37, 1,000
features); 1 to 4,096 rows; LoRA ranks 1 to 128; fp32 under TF32 and IEEE, bf16, fp16, 16-bit adapters;
contiguous, strided, misaligned and 3-D inputs; gradients for the adapters only or for everything; every
augment_mix mode with 1-4 views of one or mixed dtypes, NCHW or channels-last views, contiguous,
channels-last or strided sources, ShufflePatches; soft_label_loss MSE/KL with and without the hard-label
CE, CE alone, with and without the gradient, 7 to 21,843 classes.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import multiprocessing

import torch

from benchmarks import _triton_aot

LORA_SHAPES = {  # name: (K, N), the first features in, the second out
    "digits head": (64, 10),
    "RN50 head 10": (1024, 10), "RN50 head 100": (1024, 100), "RN50 head 365": (1024, 365),
    "RN50 head 1000": (1024, 1000), "RN50 head 21843": (1024, 21843),
    "ViT-B head 1000": (512, 1000), "ViT-B MLP up": (768, 3072), "ViT-B MLP down": (3072, 768),
    "odd": (45, 37), "unaligned K": (1000, 1000),
}
LORA_DTYPES = (("float32", "tf32"), ("float32", "ieee"), ("bfloat16", "tf32"), ("float16", "tf32"))
LOSS_CLASSES = (7, 10, 100, 200, 256, 365, 1000, 2048, 4097, 21843)


def _lora_specs(full: bool) -> list[dict]:
    shapes = list(LORA_SHAPES) if full else ["digits head", "RN50 head 1000", "ViT-B MLP up", "odd"]
    out = []
    for shape, (dt, prec) in itertools.product(shapes, LORA_DTYPES):
        K, N = LORA_SHAPES[shape]
        base = {"op": "lora_linear", "shape": shape, "dtype": dt, "precision": prec, "rows": 37, "rank": 8,
                "layout": "contiguous", "grad": "all", "bias": True, "adapters": "float32"}
        variants = [{}, {"rank": 128}, {"rows": 1}, {"rows": 256, "grad": "adapters", "bias": False},
                    {"layout": "strided"}, {"layout": "misaligned", "rank": 128}]
        if full:
            variants += [{"rank": 1}, {"rank": 16}, {"rank": 32}, {"layout": "3d"}, {"rows": 1, "rank": 128},
                         {"layout": "strided", "rank": 128, "grad": "adapters"}, {"layout": "misaligned"}]
            if K * N <= 4_000_000:  # the large-batch rules (min_rows 4096), where the memory stays small
                variants += [{"rows": 4096}, {"rows": 4096, "rank": 128, "grad": "adapters"}]
            if dt != "float32":
                variants += [{"adapters": dt}, {"adapters": dt, "rank": 128, "rows": 256}]
        out += [{**base, **v} for v in variants]
        if full or shape == "RN50 head 1000":
            out.append({**base, "op": "lora_linear_multi", "grad": "none", "rows": 256, "rank": 128})
            out.append({**base, "op": "lora_linear_multi", "grad": "none", "rows": 37})
    return out


def _augment_specs(full: bool) -> list[dict]:
    out = []
    base = {"op": "augment_mix", "batch": 64, "side": 64, "out_size": 56, "views": 2, "view_dtypes": "bfloat16",
            "channels_last": True, "source": "contiguous", "shuffle": 1}
    dtypes = ("float32", "bfloat16", "float16", "mixed") if full else ("bfloat16", "mixed")
    for mode, views, vdt in itertools.product(("none", "mixup", "cutmix"), (1, 2, 3, 4), dtypes):
        for cl in (False, True):
            out.append({**base, "mode": mode, "views": views, "view_dtypes": vdt, "channels_last": cl})
    for mode in ("none", "mixup", "cutmix"):
        variants = [{"shuffle": 2}, {"source": "channels_last"}, {"source": "strided"}, {"batch": 1}]
        if full:
            variants += [{"shuffle": 4, "views": 4}, {"out_size": 224, "side": 256, "batch": 16}, {"out_size": 17},
                         {"source": "channels_last", "shuffle": 2}, {"out_size": 32, "side": 32, "views": 1}]
        out += [{**base, "mode": mode, **v} for v in variants]
    return out


def _loss_specs(full: bool) -> list[dict]:
    out = []
    classes = LOSS_CLASSES if full else (10, 200, 1000)
    for C, dt in itertools.product(classes, ("float32", "bfloat16", "float16") if full else ("float32", "bfloat16")):
        for mode, beta, target in (("mse", 0.0, True), ("mse", 0.5, True), ("kl", 0.0, True), ("kl", 0.5, True),
                                   ("mse", 1.0, False)):
            for grad in (True, False):
                out.append({"op": "soft_label_loss", "classes": C, "dtype": dt, "mode": mode, "beta": beta,
                            "target": target, "grad": grad, "batch": 64})
    one = {"op": "soft_label_loss", "classes": 10, "dtype": "float32", "mode": "kl", "beta": 0.5, "target": True,
           "grad": True}
    return out + [{**one, "batch": 1}, {**one, "batch": 256, "classes": 1000, "dtype": "bfloat16"}]


def grid(full: bool) -> list[dict]:
    """The calls, as plain dicts (built into tensors in the worker)."""
    return _lora_specs(full) + _augment_specs(full) + _loss_specs(full)


def describe(spec: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in spec.items())


def _lora_call(spec: dict) -> None:
    from hello_fast.ops import lora_linear, lora_linear_multi

    K, N = LORA_SHAPES[spec["shape"]]
    dt, rows, r = getattr(torch, spec["dtype"]), spec["rows"], spec["rank"]
    _triton_aot._set_fp32_precision(spec["precision"])
    layout = spec["layout"]
    if layout == "strided":
        x = torch.empty(rows, 2 * K, dtype=dt)[:, ::2]  # every other feature of a wider tensor
    elif layout == "misaligned":
        x = torch.empty(rows * K + 1, dtype=dt)[1:].view(rows, K)  # data one element off 16-byte alignment
    elif layout == "3d":
        x = torch.empty(rows, 3, K, dtype=dt)
    else:
        x = torch.empty(rows, K, dtype=dt)
    w = torch.empty(N, K, dtype=dt)
    bias = torch.empty(N, dtype=dt) if spec["bias"] else None
    adt = getattr(torch, spec["adapters"])
    if spec["op"] == "lora_linear_multi":
        a, b = torch.empty(3, r, K, dtype=adt), torch.empty(3, N, r, dtype=adt)
        idx = torch.arange(x.shape[:-1].numel()).reshape(x.shape[:-1]) % 3
        with torch.no_grad():
            lora_linear_multi(x, w, a, b, idx, [1.0, 0.5, 2.0], bias, backend="triton")
        return
    a, b = torch.empty(r, K, dtype=adt), torch.empty(N, r, dtype=adt)
    trained = [a, b] + ([x] + ([bias] if bias is not None else []) if spec["grad"] == "all" else [])
    for t in trained:
        t.requires_grad_(True)
    _set_phase("forward")
    y = lora_linear(x, w, a, b, 0.5, bias, backend="triton")
    _set_phase("backward")
    torch.autograd.grad(y, trained, torch.empty_like(y))


def _augment_call(spec: dict) -> None:
    from hello_fast.ops import augment_mix, sample_augment_params

    B, side = spec["batch"], spec["side"]
    src = torch.zeros(8, 3, 2 * side if spec["source"] == "strided" else side,
                      2 * side if spec["source"] == "strided" else side, dtype=torch.uint8)
    if spec["source"] == "strided":
        src = src[:, :, ::2, ::2]
    elif spec["source"] == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    index = torch.arange(B) % 8
    g = torch.Generator().manual_seed(B * 31 + spec["out_size"])
    p = sample_augment_params(index, side, side, out_size=spec["out_size"], mode=spec["mode"], generator=g,
                              shuffle_factor=spec["shuffle"])
    names = ("float32", "bfloat16", "float16", "bfloat16") if spec["view_dtypes"] == "mixed" else (spec["view_dtypes"],) * 4
    views = [((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), getattr(torch, names[v])) for v in range(spec["views"])]
    augment_mix(src, index, p["crop"], p["flip"], p["partner"], p["lam"], p["cut"], mode=spec["mode"],
                out_size=spec["out_size"], views=views, shuffle=p.get("shuffle"), channels_last=spec["channels_last"],
                backend="triton")


def _loss_call(spec: dict) -> None:
    from hello_fast.ops import soft_label_loss

    B, C, dt = spec["batch"], spec["classes"], getattr(torch, spec["dtype"])
    s = torch.zeros(B, C, dtype=dt, requires_grad=spec["grad"])
    t = torch.zeros(B, C, dtype=dt) if spec["target"] else None
    hard = torch.arange(B) % C
    loss = soft_label_loss(s, t, hard, torch.arange(B).flip(0), torch.full((B,), 0.7), mode=spec["mode"],
                           beta=spec["beta"], temperature=2.0, backend="triton")
    if spec["grad"]:
        torch.autograd.grad(loss, [s])


_CALLS = {"lora_linear": _lora_call, "lora_linear_multi": _lora_call, "augment_mix": _augment_call,
          "soft_label_loss": _loss_call}
_ACTIVE: list = []  # the capture the calls run under (a worker runs one at a time)


def _set_phase(name: str) -> None:
    """Label the launches that follow (the forward's and the backward's launches of one LoRA call)."""
    if _ACTIVE:
        _ACTIVE[0].phase = name
# what each launch of a LoRA call computes, by (phase, kernel, position among that phase's launches of the kernel)
_LORA_ROLES = {("backward", "lora_linear._tn_kernel", 0): "G = s dy B (fp32)",
               ("backward", "lora_linear._fused_kernel", 0): "dx = dy W + G A",
               ("forward", "lora_linear._fused_kernel", 0): "y = x W^T + s (x A^T) B^T + b",
               ("forward", "lora_linear._tn_kernel", 0): "H = s x A^T (fp32)"}


def _mutate(mutation: str | None) -> None:
    """Test hook: a deliberately new launch path (a constexpr value no compile has seen)."""
    if mutation == "block_r_32":
        from hello_fast.kernels import lora_linear as kern

        kern._block_r = lambda r: max(32, kern.triton.next_power_of_2(r))
    elif mutation is not None:
        raise ValueError(f"unknown mutation {mutation!r}")


def reach(arch: int, device_name: str, sms: int, specs: list[dict], known: set, compile_unknown: bool,
          mutation: str | None = None) -> tuple[list[dict], list[dict]]:
    """Run `specs` under the stand-in driver for `arch` as device `device_name` (in a worker process).

    Returns (one entry per distinct specialisation reached: kernel, digest, Triton's key text, the first call
    that reached it; the report's rows of those compiled here: the ones not in `known`, if `compile_unknown`).
    """
    from hello_fast.kernels import augment_mix, lora_linear, soft_label_loss
    from hello_fast.ops import _backend

    _backend.triton_usable = lambda device: True  # the stand-in driver is the GPU: the dispatchers offer Triton
    _mutate(mutation)
    compiled: set = set()

    def compile_if(digest: str) -> bool:
        if not compile_unknown or digest in known or digest in compiled:
            return False
        compiled.add(digest)
        return True

    entries: dict[str, dict] = {}
    rows: list[dict] = []
    import triton

    with _triton_aot._Capture(arch, (lora_linear, augment_mix, soft_label_loss), device_name, sms,
                              compile_if=compile_if) as cap:
        _ACTIVE[:] = [cap]
        for spec in specs:
            cap.launches.clear()
            cap.phase = None
            try:
                _CALLS[spec["op"]](spec)
            except Exception as e:  # a call the dispatcher refuses is a finding too
                entries[f"error:{describe(spec)}"] = {"arch": arch, "kernel": spec["op"], "specialisation": None,
                                                      "text": f"{type(e).__name__}: {e}"[:300], "call": describe(spec)}
                continue
            seen: dict = {}
            for launch in cap.launches:
                phase = launch["phase"]
                n = seen[(phase, launch["kernel"])] = seen.get((phase, launch["kernel"]), -1) + 1
                digest = launch["specialisation"]
                if digest not in entries:
                    entries[digest] = {"arch": arch, "kernel": launch["kernel"], "specialisation": digest,
                                       "text": launch["specialisation_text"], "call": describe(spec)}
                if launch.get("skipped"):
                    continue
                base = {"op": spec["op"], "arch": arch, "scenario": f"dispatcher: {describe(spec)}",
                        "dtype": spec.get("dtype") or spec.get("view_dtypes"), "precision": spec.get("precision"),
                        "fast_path": _fast_path(spec), "toolchain": f"triton {triton.__version__}", "reached": True}
                role = _LORA_ROLES.get((phase, launch["kernel"], n)) if spec["op"] == "lora_linear" else None
                rows.append(_triton_aot.launch_row(launch, base, arch, role))
                launch["compiled"] = None  # the row holds what is needed; let the binary go
        _ACTIVE.clear()
    return list(entries.values()), rows


def _fast_path(spec: dict) -> bool:
    if spec["op"] in ("lora_linear", "lora_linear_multi"):
        op = importlib.import_module("hello_fast.ops.lora_linear")  # the module (the package exports the function)
        _triton_aot._set_fp32_precision(spec["precision"])
        return op._triton_is_fast(getattr(torch, spec["dtype"]))
    return True


def devices(archs) -> list[tuple[int, str, int]]:
    """(arch, device name, SMs) the grid runs as: each named config table on its architecture, and a device of
    each architecture that has no table of its own."""
    out = []
    for arch in archs:
        out.append((arch, f"(any sm_{arch} GPU)", _triton_aot._DEFAULT_DEVICE.get(arch, 132)))
        for key in _triton_aot.lora_tables():
            if key != "default" and arch in _triton_aot._table_archs(key, [arch]):
                out.append((arch, key, _triton_aot._NAMED_SMS.get(key, 132)))
    return out


def coverage(archs, *, full: bool, known_rows: list[dict], compile_unknown: bool, workers: int = 2,
             mutation: str | None = None) -> tuple[dict, list[dict]]:
    """Reach the grid on every device of `archs` in worker processes.

    Returns ({(arch, digest): entry} of every reached specialisation, rows of those compiled here).
    """
    known = {}
    for r in known_rows:
        if r.get("specialisation"):
            known.setdefault(r["arch"], set()).add(r["specialisation"])
    specs = grid(full)
    jobs = []
    for arch, name, sms in devices(archs):
        # the GEMM calls per device table; augment_mix and soft_label_loss do not read the device name: once per arch
        own = [s for s in specs if s["op"].startswith("lora")] if not name.startswith("(any") else specs
        n = len(own)  # contiguous parts: calls of one shape and op share their specialisations within one worker
        jobs += [(arch, name, sms, own[i * n // workers:(i + 1) * n // workers]) for i in range(workers)]
    reached: dict = {}
    rows: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                initializer=_triton_aot._init_worker) as pool:
        futures = [pool.submit(reach, arch, name, sms, part, known.get(arch, set()), compile_unknown, mutation)
                   for arch, name, sms, part in jobs]
        for fut in futures:
            entries, new_rows = fut.result()
            for e in entries:
                reached.setdefault((e["arch"], e["specialisation"] or e["call"]), e)
            rows += new_rows
    # two workers may compile one new specialisation: keep one row per (arch, specialisation)
    unique: dict = {}
    for r in rows:
        unique.setdefault((r["arch"], r["specialisation"], r.get("launch")), r)
    return reached, list(unique.values())


def uncovered(reached: dict, rows: list[dict]) -> list[dict]:
    """The reached specialisations without a clean compiled row (missing, a compile error, or a call that failed)."""
    ok = {(r["arch"], r["specialisation"]) for r in rows
          if r.get("specialisation") and r.get("registers") is not None and not r.get("error")}
    return [e for key, e in reached.items() if e["specialisation"] is None or key not in ok]
