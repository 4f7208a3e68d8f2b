"""Extension methods: φ(W) = W + s·ΔW adds a new subspace."""
