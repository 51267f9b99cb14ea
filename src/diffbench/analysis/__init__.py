"""Reading finished runs: collection into comparable groups, statistics, claims, figures, the report."""
