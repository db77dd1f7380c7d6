"""Pure numerics, no Lightning: tableaux, one RK step, step-size control, the stepping loop."""

from nde_zoo.solvers.errors import MaxStepsExceeded, NonFiniteStateError, SolverError, StepSizeUnderflow
from nde_zoo.solvers.integrate import (
    CountedField,
    Path,
    SolveStats,
    check_finite_outputs,
    check_inputs,
    fixed_path,
    hairer_first_step,
    integrate,
    odeint,
    rk_stepper,
)
from nde_zoo.solvers.rk import Field, StepResult, rk_increment, rk_step, stage_input
from nde_zoo.solvers.stepping import PIController, Stepping, error_ratio, initial_step_size, rms_norm
from nde_zoo.solvers.tableau import TABLEAUX, ButcherTableau, get_tableau, solver_names

__all__ = [
    "TABLEAUX",
    "ButcherTableau",
    "CountedField",
    "Field",
    "MaxStepsExceeded",
    "NonFiniteStateError",
    "PIController",
    "Path",
    "SolveStats",
    "SolverError",
    "StepResult",
    "StepSizeUnderflow",
    "Stepping",
    "check_finite_outputs",
    "check_inputs",
    "fixed_path",
    "error_ratio",
    "get_tableau",
    "hairer_first_step",
    "initial_step_size",
    "integrate",
    "odeint",
    "rk_increment",
    "rk_step",
    "rk_stepper",
    "rms_norm",
    "solver_names",
    "stage_input",
]
