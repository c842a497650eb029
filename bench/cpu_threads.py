"""Why CPU runs take the free cores, not all cores: a tiny encoder's training steps beside busy-loop competitors.

    python bench/cpu_threads.py                 # under a minute, on a 2-core box that others share too
    python bench/cpu_threads.py --seconds 5 --rounds 3

Starts busy-loop processes on all cores but one (another user's jobs), then trains a tiny transformer encoder
with 1 thread and with one thread per core, alternating, and prints the steps/s of each round, their medians,
the ratio 1-thread / all-threads, and what the engine's rule (`cpu_threads_rule`) picks for that load.
Oversubscribed OpenMP threads wait for the one that shares a core with a competitor at every barrier.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time


def busy_loop() -> None:
    """Another user's job: one core, flat out, until killed."""
    while True:
        pass


def steps_per_second(threads: int, seconds: float) -> float:
    """Training steps per second of a tiny encoder (2 layers, width 128) with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(8, 48, 128)

    def step() -> None:
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()

    step()  # warm-up: allocations and the OpenMP team
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from clfbench.engine.daemon import cpu_threads_rule, host_cpu_load

    cores, _load = host_cpu_load()
    if cores < 2:
        raise SystemExit("needs at least 2 cores to compare 1 thread with several")
    competitors = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(cores - 1)]
    for process in competitors:
        process.start()
    try:
        time.sleep(1.0)
        rounds: dict[int, list[float]] = {1: [], cores: []}
        for index in range(args.rounds):
            for threads in (1, cores) if index % 2 == 0 else (cores, 1):
                rounds[threads].append(steps_per_second(threads, args.seconds))
                print(f"round {index + 1}: {threads} thread(s): {rounds[threads][-1]:.2f} steps/s", flush=True)
    finally:
        for process in competitors:
            process.kill()
    one, many = statistics.median(rounds[1]), statistics.median(rounds[cores])
    print(f"{cores} cores, {len(competitors)} busy-loop competitor(s); median steps/s: 1 thread {one:.2f}, "
          f"{cores} threads {many:.2f}; 1-thread / {cores}-thread = {one / many:.2f}x")
    chosen = cpu_threads_rule(cores=cores, load=float(len(competitors)), own_threads=0, slots=1)
    print(f"the engine's rule at load {len(competitors)}.0 of {cores} cores, 1 CPU slot: {chosen} thread(s) "
          f"(os.getloadavg now: {os.getloadavg()[0]:.1f}; it trails by about a minute)")


if __name__ == "__main__":
    main()
