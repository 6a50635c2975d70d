"""Making the network smaller or int8-friendlier before it is compiled: pruning, reconstruction, distillation, weight improvement."""
