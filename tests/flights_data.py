"""A small flights-style data set in the formats users bring: flights as CSV, hourly weather per airport
as JSON Lines, daily carrier statistics as parquet. Deterministic by seed; every time is a UTC timestamp.

- flights (CSV folder, two part files): flight_id, origin, carrier, dep_time, delay (minutes; the label).
- weather (JSON Lines): airport, obs_time (on the hour), temp (°C), wind (knots); ~4% of the hours are
  missing, and one airport has a 6-hour outage, so an as-of join with a 3-hour max age leaves some
  flights without weather.
- carrier_daily (parquet): carrier, day (UTC midnight the figure is published; it describes the day
  before), delay_avg (minutes).

Delays depend on the origin's wind and the carrier's recent delay level, so a model has signal.
"""

from __future__ import annotations

from pathlib import Path

AIRPORTS = ["ATL", "ORD", "DFW", "DEN", "LAX", "JFK", "SFO", "SEA", "MIA", "BOS"]
CARRIERS = ["AA", "DL", "UA", "WN", "B6"]
START = "2026-01-05"
DAYS = 14

__all__ = ["AIRPORTS", "CARRIERS", "START", "DAYS", "flights_frames", "write_flights_sources"]


def flights_frames(seed: int = 0, n_flights: int = 2000):
    """The three tables as pandas DataFrames (UTC-aware timestamps): flights, weather, carrier_daily."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    start = pd.Timestamp(START, tz="UTC")

    hours = pd.date_range(start - pd.Timedelta(hours=12), periods=(DAYS + 1) * 24, freq="h", tz="UTC")
    weather = pd.DataFrame([(a, t) for a in AIRPORTS for t in hours], columns=["airport", "obs_time"])
    base_temp = dict(zip(AIRPORTS, rng.uniform(-5, 25, len(AIRPORTS))))
    hour_of_day = weather["obs_time"].dt.hour.to_numpy()
    weather["temp"] = (weather["airport"].map(base_temp).to_numpy() + 6 * np.sin((hour_of_day - 9) / 24 * 2 * np.pi)
                       + rng.normal(0, 1.5, len(weather))).round(1)
    weather["wind"] = rng.gamma(2.0, 5.0, len(weather)).round(1)
    keep = rng.random(len(weather)) > 0.04
    outage = (weather["airport"] == "SEA") & (weather["obs_time"] >= start + pd.Timedelta(days=3, hours=6)) & \
             (weather["obs_time"] < start + pd.Timedelta(days=3, hours=12))
    weather = weather[keep & ~outage].reset_index(drop=True)

    days = pd.date_range(start - pd.Timedelta(days=3), periods=DAYS + 4, freq="D", tz="UTC")
    level = dict(zip(CARRIERS, rng.uniform(5, 20, len(CARRIERS))))
    carrier_daily = pd.DataFrame([(c, d) for c in CARRIERS for d in days], columns=["carrier", "day"])
    carrier_daily["delay_avg"] = (carrier_daily["carrier"].map(level).to_numpy()
                                  + rng.normal(0, 3, len(carrier_daily))).round(2)

    minutes = np.sort(rng.integers(0, DAYS * 24 * 60, n_flights))
    busy = np.linspace(2, 1, len(AIRPORTS))  # hubs first: ATL twice as busy as BOS
    flights = pd.DataFrame({
        "flight_id": np.arange(1, n_flights + 1, dtype="int64"),
        "origin": rng.choice(AIRPORTS, n_flights, p=busy / busy.sum()),
        "carrier": rng.choice(CARRIERS, n_flights),
        "dep_time": start + pd.to_timedelta(minutes, unit="min"),
    })
    at_hour = flights.assign(obs_time=flights["dep_time"].dt.floor("h")).merge(
        weather, how="left", left_on=["origin", "obs_time"], right_on=["airport", "obs_time"])
    wind = at_hour["wind"].fillna(10.0).to_numpy()
    flights["delay"] = (rng.gamma(1.5, 6.0, n_flights) - 8 + 0.8 * np.maximum(wind - 12, 0)
                        + 0.5 * flights["carrier"].map(level).to_numpy()).round(1)
    return flights, weather, carrier_daily


def write_flights_sources(folder: Path, seed: int = 0, n_flights: int = 2000) -> dict[str, Path]:
    """Write the three sources under ``folder``; returns their paths under "flights", "weather",
    "carrier_daily" (a CSV folder, a JSON Lines file, a parquet file)."""
    folder = Path(folder)
    flights, weather, carrier_daily = flights_frames(seed, n_flights)
    flights_dir = folder / "flights_csv"
    flights_dir.mkdir(parents=True, exist_ok=True)
    half = len(flights) // 2
    flights.iloc[:half].to_csv(flights_dir / "part-0.csv", index=False)
    flights.iloc[half:].to_csv(flights_dir / "part-1.csv", index=False)
    (flights_dir / "_SUCCESS").write_text("")  # what Spark/Hadoop writers leave; readers skip it
    weather_file = folder / "weather.json"
    weather.to_json(weather_file, orient="records", lines=True, date_format="iso", date_unit="s")
    daily_file = folder / "carrier_daily.parquet"
    # Spark cannot read pandas' default nanosecond timestamps: write microseconds.
    carrier_daily.to_parquet(daily_file, index=False, coerce_timestamps="us", allow_truncated_timestamps=True)
    return {"flights": flights_dir, "weather": weather_file, "carrier_daily": daily_file}
