"""Paper-reproduction benchmarks behind ``python -m nde_zoo bench NAME [--quick]``.

Each benchmark is a module ``nde_zoo.bench.<name>`` with ``run(quick: bool) -> BenchReport``.
Ratios are measured side by side in one run; figures go to ``docs/benchmarks.md``.
"""

BENCHMARKS: dict[str, str] = {
    "gradients": "gradient error of each ODE strategy x solver vs float64 backprop (exact ones at round-off)",
    "solver_overhead": "our fixed-step RK4 vs torchdiffeq's, forward and forward+backward",
    "white_dwarf": "McCallum & Foster 2024: reversible vs binomial checkpointing vs backprop on the white dwarf equation",
    "ernode": "Pal et al. 2023: local ERNODE regularisation lowers test NFE of the ODE classifier on digits",
    "symplectic": "Matsubara et al. 2021: symplectic adjoint vs adjoint, backprop, ACA on a KdV Neural ODE: loss, memory, time, gradient error",
    "cnf_memory": "McCallum & Foster 2024: reversible vs backprop (+ symplectic, adjoint) FFJORD on two moons, midpoint/rk4/dopri5: NLL and memory",
    "seminorm": "Kidger et al. 2021: RMS vs torchdiffeq's mixed default vs seminorm adjoint norms on a Neural CDE and a Neural ODE",
    "compiled": "eager vs compile=True per strategy: s per training step, compile cost, memory (white dwarf, CNF, memory-bound)",
    "auto": "strategy=auto's plan (predicted peak, choice) against real training steps of every candidate, two budgets",
    "cde_memory": "McCallum & Foster 2024: reversible vs backprop Neural CDE with midpoint/rk4/dopri5: accuracy and memory",
    "pde": "model=pde through long rollouts: kept bytes, s per step, longest rollout under 2 GB per strategy (KdV in 1-D, ZK in 2-D), auto's choice, long vs short training windows",
}
