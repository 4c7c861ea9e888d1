"""Rule optimization: loss_delta (predicted loss increases), problem (the MILP's data and
solutions), direct (solving, and the direct HiGHS model), decomposition (the layer decomposition
with its column pool), pareto (the epsilon-constraint front) and select (the choice by
validation loss)."""
