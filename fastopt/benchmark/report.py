"""Presenting a run: the Markdown table, the JSON document, the % of roofline bar chart."""

from __future__ import annotations

import json
import math

__all__ = ["SCHEMA", "markdown", "plot", "write_json"]

SCHEMA = "fastopt-bench/1"

# JSON fields of a timed row (see README "Benchmarking"); a row that was skipped or failed
# verification has "skipped" or "error" and none of the timing fields.
ROW_FIELDS = ("name", "group", "backend", "elements", "bytes_per_element", "traffic", "write_allocate",
              "verified", "median_ms", "gbps", "bandwidth_gbps", "pct_of_bandwidth", "repeats")


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, fmt)


def _row_line(r: dict) -> str:
    name = r["name"]
    if r.get("skipped"):
        return f"| {name} | — | — | — | — | — | — | skipped: {r['skipped']} |"
    if r.get("error"):
        return f"| {name} | — | — | — | — | — | — | FAILED verification: {r['error']} |"
    torch = "—"
    if r.get("torch_ms") is not None:
        torch = f"{r['torch_impl']} {r['torch_ms']:.2f} ms: {r['speedup_vs_torch']:.2f}×"
    elif r.get("torch_skipped"):
        torch = f"— ({r['torch_skipped']})"
    numpy = _num(r.get("speedup_vs_numpy"), ".1f") + "×" if r.get("speedup_vs_numpy") else "—"
    wa = "†" if r.get("write_allocate") else ""
    ms = r["median_ms"]
    time = f"{ms * 1e3:.0f} µs" if ms < 1 else f"{ms:.2f}"
    return (f"| {name} | {r['bytes_per_element']}{wa} | {time} | {_num(r['gbps'], '.1f')} | "
            f"{_num(r['pct_of_bandwidth'], '.0f')}% | {numpy} | {torch} | {r.get('note', '')} |")


def markdown(doc: dict) -> str:
    """The run as Markdown: a header line, the table, the cold start."""
    meta = doc["meta"]
    bw = doc["bandwidth"]
    lines = [
        f"{meta['dtype']}, backend {meta['backend']!r}, {meta['threads']} threads ({meta['threading_layer']}), "
        f"median of {meta['repeats']} (NumPy reference: {meta['reference_repeats']}); "
        f"in-place bandwidth (a[i] += s·b[i], {bw['bytes_per_element']} B per element, {bw['elements']:,} elements): "
        f"{_num(bw['median_gbps'], '.1f')} GB/s over the run (per row: measured interleaved with it)"
        + (f"; timing rounds that started on an otherwise idle machine: {meta['idle_rounds']} "
           f"(waiting up to {meta['wait_idle']:g} s each)" if meta.get("idle_rounds") else ""),
        "",
        "| kernel | B/elem | median ms | GB/s | % of bandwidth | vs NumPy | torch (best): vs torch | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_line(r) for r in doc["rows"]]
    formulas = {}
    for r in doc["rows"]:
        if r.get("traffic"):
            formulas.setdefault(r["traffic"], []).append(r["name"])
    if formulas:
        lines += ["", "Compulsory bytes per element (each input read once per pass, each output written once):"]
        lines += [f"- {formula}: {', '.join(names)}" for formula, names in formulas.items()]
    if any(r.get("write_allocate") for r in doc["rows"]):
        lines += ["", "† out-of-place output: ordinary stores first read each output line (write-allocate), one "
                      "itemsize per element more than counted; the numba batch-norm kernels write outputs of 2 MiB "
                      "and more with streaming stores, which skip that read."]
    cold = doc.get("cold_start")
    if cold and "first_compile_s" in cold:
        modules = ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in cold["modules"].items())
        lines += ["", f"Cold start: {cold['kernels']} CPU kernels ({cold['signatures']} signatures) compile in "
                      f"{cold['first_compile_s']:.1f} s with an empty cache "
                      f"({modules}); "
                      f"loading them from the cache takes {cold['cached_load_s']:.2f} s; import numba "
                      f"{cold['import_numba_s']:.2f} s, import fastopt.kernels.numba_cpu "
                      f"{cold.get('import_kernels_s', 0.0):.2f} s (first time)"
                      + (f"; with the filled cache, `import fastopt` and the first Adam step take "
                         f"{cold['import_and_first_adam_step_s']:.2f} s in a new process."
                         if cold.get("import_and_first_adam_step_s") is not None else ".")]
        per_dtype: dict[str, float] = {}
        for _, _, dtype, seconds in cold.get("per_kernel") or ():
            per_dtype[dtype] = per_dtype.get(dtype, 0.0) + seconds
        if per_dtype:
            lines[-1] += " By dtype: " + ", ".join(f"{d} {s:.1f} s" for d, s in per_dtype.items()) + "."
        train = cold.get("first_train")
        if train and train.get("runs"):
            runs = [f"`{r['command']}` compiles for {_num(r['compile_s'], '.1f')} s, {r['whole_s']:.1f} s in all"
                    for r in train["runs"]]
            lines += ["", "A new user's first runs (" + train["method"] + "): " + "; then ".join(runs) + "."]
        elif train and train.get("skipped"):
            lines += ["", f"A new user's first `fastopt train`: skipped ({train['skipped']})."]
    elif cold and cold.get("skipped"):
        lines += ["", f"Cold start: skipped ({cold['skipped']})."]
    elif cold and cold.get("error"):
        lines += ["", f"Cold start: failed ({cold['error']})."]
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False, default=_plain)
        f.write("\n")


def _plain(value):
    try:
        return value.item()  # NumPy scalars
    except AttributeError:
        raise TypeError(f"not JSON serializable: {value!r}") from None


def plot(doc: dict, path: str) -> None:
    """A horizontal bar per timed row: % of the in-place bandwidth (the roofline of a streaming kernel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("pct_of_bandwidth") is not None][::-1]
    palette = {"optimizer": "tab:blue", "batchnorm": "tab:orange", "many-tensors": "tab:green",
               "training-step": "tab:purple"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 2.2))
    values = [r["pct_of_bandwidth"] for r in rows]
    ax.barh([r["name"] for r in rows], values, color=[palette.get(r["group"], "tab:gray") for r in rows])
    ax.axvline(100, color="black", linewidth=1)
    for y, v in enumerate(values):
        ax.text(v + 1, y, f"{v:.0f}%", va="center", fontsize=8)
    handles = [matplotlib.patches.Patch(color=c, label=g) for g, c in palette.items()
               if any(r["group"] == g for r in rows)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.32 * len(rows) + 1.8) - 0.06),
              ncol=len(handles), fontsize=8, frameon=False)
    meta = doc["meta"]
    ax.set_xlabel("% of the in-place bandwidth (a[i] += s·b[i]) measured in the same rounds")
    ax.set_title(f"fastopt {meta['backend']}, {meta['dtype']}, {meta['threads']} threads, "
                 f"{meta['machine']['cpu']}", fontsize=9)
    ax.set_xlim(0, max([110.0] + [v + 15 for v in values]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
