"""Command line, process launch, training loop and metric writers."""
