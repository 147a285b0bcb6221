"""The suite's outputs: rows as a terminal table, appended to a CSV, and plotted to a PNG."""
import csv
import math
import os
from typing import Dict, Sequence

COLUMNS = [
    "date", "device", "torch", "triton", "value_checks", "case", "shape", "mode", "dtype", "impl", "backend",
    "ms", "ms_spread", "peak_mib", "gflop", "mbytes", "tflops", "flops_frac", "gbps", "bw_frac",
    "speedup_vs_eager", "speedup_vs_compile", "rel_err_vs_eager",
    "ceiling_tflops", "ceiling_gbps", "note",
]

# What the terminal table shows, with its headers.
TABLE = [
    ("case", "case"), ("mode", "mode"), ("dtype", "dtype"), ("impl", "impl"), ("ms", "ms"), ("ms_spread", "spread"),
    ("peak_mib", "peak MiB"), ("tflops", "TFLOP/s"), ("flops_frac", "of peak"), ("gbps", "GB/s"),
    ("bw_frac", "of peak"), ("speedup_vs_eager", "x eager"), ("speedup_vs_compile", "x compile"),
    ("rel_err_vs_eager", "rel err"), ("note", "note"),
]


def fmt(value, column: str = "") -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column.endswith("_frac") or column == "ms_spread":
            return f"{100 * value:.1f}%"
        if column == "rel_err_vs_eager":
            return f"{value:.1e}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def table(rows: Sequence[Dict]) -> str:
    """Rows as an aligned text table."""
    cells = [[header for _, header in TABLE]]
    for row in rows:
        impl = row["impl"] if row["impl"] != "fastdin" else f"fastdin[{row['backend']}]"
        cells.append([impl if key == "impl" else _cell(row, key) for key, _ in TABLE])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(row: Dict, key: str) -> str:
    if key == "peak_mib" and row.get("ms") and row.get("peak_mib") is None:
        return "n/a"  # only CUDA's allocator reports a peak; on the CPU it is not guessed
    return fmt(row.get(key), key)


def check_csv(path: str, columns: Sequence[str] = COLUMNS) -> None:
    """Raise ValueError if the CSV at path exists with other columns (rows appended would not line up)."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            raise ValueError(f"{path}: its columns are not this version's ({len(header)} against {len(columns)}); "
                             f"give another --out-dir or move the file")


def append_csv(path: str, rows: Sequence[Dict], columns: Sequence[str] = COLUMNS) -> None:
    """Append rows to the CSV at path (its folder made if missing), writing the header when the file is
    new; a ValueError (`check_csv`) if the file has other columns."""
    check_csv(path, columns)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def keep_rows(out_dir: str, name: str, rows: Sequence[Dict]) -> None:
    """Append rows (dicts with the same keys) to out_dir/name, and say so."""
    path = os.path.join(out_dir, name)
    append_csv(path, rows, list(rows[0]))
    print(f"appended {len(rows)} rows to {path}")


def _csv_value(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def plot(path: str, rows: Sequence[Dict], title: str) -> None:
    """Speedup over eager per case (left) and time versus T for the attention sweep (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if not r["case"].startswith("sweep-") and r["impl"] != "eager" and r.get("ms")]
    sweep = [r for r in rows if r["case"].startswith("sweep-") and r.get("ms")]
    panels = int(bool(main)) + int(bool(sweep)) or 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 6), squeeze=False)
    axes = list(axes[0])
    if main:
        _plot_speedups(axes.pop(0), main, [r["case"] for r in rows])
    if sweep:
        _plot_sweep(axes.pop(0), sweep)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def _plot_speedups(ax, main: Sequence[Dict], case_order: Sequence[str]) -> None:
    labels = sorted({(r["case"], r["mode"], r["dtype"]) for r in main}, key=lambda k: case_order.index(k[0]))
    impls = [i for i in ("fastdin", "compile", "deepctr") if any(r["impl"] == i for r in main)]
    width = 0.8 / len(impls)
    for n, impl in enumerate(impls):
        speed = {(r["case"], r["mode"], r["dtype"]): r.get("speedup_vs_eager") for r in main if r["impl"] == impl}
        ax.bar([i + n * width for i in range(len(labels))], [speed.get(k) or 0 for k in labels], width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{c} {m[:5]} {d}" for c, m, d in labels], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speedup over eager (higher is better)")
    ax.set_title("speedup per case")
    ax.legend()


def _plot_sweep(ax, sweep: Sequence[Dict]) -> None:
    for key in sorted({(r["impl"], r["mode"], r["dtype"]) for r in sweep}):
        points = sorted((int(r["case"][len("sweep-T"):]), r["ms"]) for r in sweep
                        if (r["impl"], r["mode"], r["dtype"]) == key)
        ax.plot([t for t, _ in points], [ms for _, ms in points], marker="o", label=" ".join(key))
    ax.set_xlabel("history length T")
    ax.set_ylabel("median ms")
    ax.set_title(f"attention unit, time versus T ({sweep[0]['shape'].split('x')[0]} users)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
