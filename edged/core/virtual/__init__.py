"""Virtual (aggregation) meters: plans and the combination of their inputs (pure)."""
