"""What each command computes, as data: coverage, plan, compare, doctor, steps, overview."""
