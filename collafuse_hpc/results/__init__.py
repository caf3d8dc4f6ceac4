"""The results file: its schema, its writers (parts, index, bundle, TensorBoard) and
its readers (inspect, export, compare)."""
