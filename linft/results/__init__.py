"""Results: run folders -> one tidy DataFrame -> selection methods, tables, figures, report."""
