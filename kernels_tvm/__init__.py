"""TVM TensorIR kernels for the DHSA custom ops and dense attention, per target family."""
