"""Run Leopard-EM 1.3.0's match_template or refine_template from its own YAML.

bench/bench_2dtm.py starts this script once per measured run, so that the child's CPU
time and peak memory are Leopard-EM's alone. Usage:

    python bench/leopard_runner.py match match.yaml --output particles.csv
        [--orientation-batch-size 16] [--result result.json]
    python bench/leopard_runner.py refine refine.yaml --output refined.csv
        [--batch-size 32] [--result result.json]

It does what Leopard-EM's example programs (programs/match_template/
run_match_template.py, programs/refine_template/run_refine_template.py) do:
`MatchTemplateManager.from_yaml(...).run_match_template(...)`, then the peak table to
CSV (`results_to_dataframe`); `RefineTemplateManager.from_yaml(...)
.run_refine_template(...)`. It writes the search counts as JSON to --result (for
match_template, the number of correlations is the one Leopard-EM reports).

Two patches make Leopard-EM 1.3.0 run here; neither changes what it computes:

* CPU-only torch: its match_template backend creates torch.cuda.Stream objects,
  enters torch.cuda.stream(...), asks for torch.cuda.default_stream and calls
  torch.cuda.synchronize / ipc_collect and Tensor.record_stream unconditionally
  (backend/core_match_template.py, backend/cross_correlation.py), all of which raise
  "Torch not compiled with CUDA enabled". Without CUDA they become no-ops (CPU work is
  synchronous, so a no-op stream is exact). The patch runs when this file is imported,
  so Leopard-EM's worker processes (multiprocessing "spawn", which re-imports this
  file as __mp_main__) get it too. With CUDA nothing is patched.
* Orientation grid order: see `split_orientation_grid`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch


class _NoStream:
    """Stands in for torch.cuda.Stream where there is no CUDA: CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def query(self) -> bool:
        return True


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _no_stream_context(stream: Any = None) -> nullcontext[None]:
    return nullcontext()


def _no_stream(device: Any = None) -> _NoStream:
    return _NoStream()


def patch_cuda_for_cpu() -> bool:
    """Make Leopard-EM's unconditional CUDA stream calls no-ops on a CPU-only torch.

    Returns:
        True if torch has no CUDA and the patch was applied.
    """
    if torch.cuda.is_available():
        return False
    original_record_stream = torch.Tensor.record_stream

    def record_stream(tensor: torch.Tensor, stream: Any) -> None:
        if not isinstance(stream, _NoStream):
            original_record_stream(tensor, stream)

    replacements: dict[str, Any] = {
        "Stream": _NoStream,
        "stream": _no_stream_context,
        "default_stream": _no_stream,
        "current_stream": _no_stream,
        "synchronize": _no_op,
        "empty_cache": _no_op,
        "ipc_collect": _no_op,
    }
    for name, replacement in replacements.items():
        setattr(torch.cuda, name, replacement)
    setattr(torch.Tensor, "record_stream", record_stream)  # noqa: B010
    return True


def split_orientation_grid(
    euler_angles: torch.Tensor,
) -> tuple[list[tuple[float, float]], list[float]]:
    """(phi, theta) pairs and psi values of a Cartesian-product grid in either order.

    Leopard-EM 1.3.0's CorrelationTable requires psi to vary fastest, but the
    torch-so3 0.6.0 it pins returns grids with psi varying slowest, so every
    match_template run fails after the search ("euler_angles is not a valid
    Cartesian product"; later Leopard-EM versions accept both orders). This accepts
    both; it only labels the correlation table (empty unless compute_correlation_table)
    and changes no computed map.

    Args:
        euler_angles: (N, 3) (phi, theta, psi) in degrees.

    Returns:
        The (phi, theta) pairs and the psi values, each in grid order.
    """
    n = euler_angles.shape[0]
    n_psi = int(torch.unique(euler_angles[:, 2]).numel())
    if n % n_psi:
        raise ValueError(f"{n} orientations are not a grid over {n_psi} psi values")
    n_pairs = n // n_psi
    psi_fastest = euler_angles.reshape(n_pairs, n_psi, 3)
    if bool((psi_fastest[:, :, :2] == psi_fastest[:, :1, :2]).all()):
        pairs, psi = psi_fastest[:, 0, :2], psi_fastest[0, :, 2]
    else:
        psi_slowest = euler_angles.reshape(n_psi, n_pairs, 3)
        if not bool((psi_slowest[:, :, 2] == psi_slowest[:, :1, 2]).all()):
            raise ValueError("orientations are not a (phi, theta) x psi grid")
        pairs, psi = psi_slowest[0, :, :2], psi_slowest[:, 0, 2]
    return [(float(a), float(b)) for a, b in pairs.tolist()], [float(p) for p in psi.tolist()]


def patch_correlation_table_grid() -> None:
    """Let Leopard-EM 1.3.0 label its correlation table for torch-so3 0.6.0's grids."""
    from leopard_em.pydantic_models.results import correlation_table

    name = "derive_orientation_grid_from_full_angles"
    setattr(correlation_table, name, split_orientation_grid)


# At import, not under __main__: Leopard-EM's spawned workers re-import this file.
CUDA_PATCHED = patch_cuda_for_cpu()


def run_match(config: Path, output: Path, orientation_batch_size: int) -> dict[str, Any]:
    """Leopard-EM match_template: maps where the YAML says, peak table to `output`."""
    from leopard_em.pydantic_models.managers import MatchTemplateManager

    patch_correlation_table_grid()
    manager = MatchTemplateManager.from_yaml(str(config))
    manager.run_match_template(orientation_batch_size=orientation_batch_size, do_result_export=True)
    table = manager.results_to_dataframe()
    table.to_csv(output)
    result = manager.match_template_result
    return {
        "program": "match_template",
        "correlations": int(result.total_projections),
        "orientations": int(result.total_orientations),
        "defocus_planes": int(result.total_defocus),
        "micrograph_shape": list(manager.micrograph.shape),
        "peaks": len(table),
    }


def run_refine(config: Path, output: Path, batch_size: int) -> dict[str, Any]:
    """Leopard-EM refine_template: refined particle table to `output`."""
    from leopard_em.pydantic_models.managers import RefineTemplateManager

    manager = RefineTemplateManager.from_yaml(str(config))
    particles = int(manager.particle_stack.num_particles)
    offsets = int(manager.orientation_refinement_config.euler_angles_offsets.shape[0])
    defoci = int(manager.defocus_refinement_config.defocus_values.numel())
    pixel_sizes = int(manager.pixel_size_refinement_config.pixel_size_values.numel())
    manager.run_refine_template(
        str(output), correlation_batch_size=batch_size, allow_file_overwrite=True
    )
    return {
        "program": "refine_template",
        "correlations": particles * offsets * defoci * pixel_sizes,
        "particles": particles,
        "orientation_offsets": offsets,
        "defocus_planes": defoci,
        "pixel_sizes": pixel_sizes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", choices=["match", "refine"])
    parser.add_argument("config", type=Path, help="Leopard-EM YAML")
    parser.add_argument("--output", type=Path, required=True, help="CSV to write")
    parser.add_argument("--orientation-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--result", type=Path, help="JSON file for the search counts")
    args = parser.parse_args(argv)
    if args.program == "match":
        summary = run_match(args.config, args.output, args.orientation_batch_size)
    else:
        summary = run_refine(args.config, args.output, args.batch_size)
    summary["cuda_patched"] = CUDA_PATCHED
    summary["torch_threads"] = torch.get_num_threads()
    text = json.dumps(summary)
    if args.result is not None:
        args.result.write_text(text + "\n")
    print(text, file=sys.stderr)


if __name__ == "__main__":
    main()
