"""Scheduling of feature jobs (cron, DAG, run ledger) — not built yet."""
