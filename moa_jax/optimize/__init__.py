"""Rule optimization: loss_delta (predicted loss increases), milp (the HiGHS model), pareto (the
epsilon-constraint front) and select (the choice by validation loss)."""
