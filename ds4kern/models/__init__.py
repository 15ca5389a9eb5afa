"""Model blocks built from ds4kern ops (dense projections through the array library's matmul)."""
