"""Scheduling on Dagster: the plan from the declarations (plan), Dagster definitions (assets), and the
daemon + webserver of a project (service). Import the submodules; importing this package loads nothing."""
