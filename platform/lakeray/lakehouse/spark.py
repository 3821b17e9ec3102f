"""The one Spark session factory, with Delta Lake enabled from jars cached once per user.

The Delta jars are Maven artifacts, not part of the pip package. ``lakeray setup`` (``make setup``)
calls :func:`resolve_delta_jars` once (through Spark's own Ivy), which puts them in the per-user cache
``$LAKERAY_CACHE/jars/<coordinate>`` (default ``~/.cache/lakeray``), shared by every project, or in
``spark.jars_dir`` when a profile names one; every session after that starts with ``spark.jars``
pointing there and never resolves anything at start-up, so it works offline.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lakeray.errors import SetupError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from lakeray.config import Settings

__all__ = ["DELTA_PACKAGE", "check_java", "delta_jars", "delta_jars_dir", "resolve_delta_jars",
           "object_store_package", "object_store_jars_dir", "resolve_object_store_jars",
           "user_cache_dir", "create_spark_session", "spark_session"]

# delta-spark 4.4.0 is the newest release whose jar is published for Spark 4.2 (4.4.1 is not).
DELTA_PACKAGE = "io.delta:delta-spark_4.2_2.13:4.4.0"
_MARKER = "RESOLVED"


def check_java() -> str:
    """Path of the java binary Spark will use; SetupError with the fix when there is none or it is too old."""
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home, "bin", "java") if java_home else None
    found = str(java) if java is not None and java.is_file() else shutil.which("java")
    if not found:
        raise SetupError(
            "Java was not found: Spark needs a JDK 17 or 21",
            "install one (Debian: apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME",
        )
    major = _java_major(found)
    if major is not None and major < MIN_JAVA:
        # Spark 4 would die at start-up with an UnsupportedClassVersionError deep in a JVM stack trace.
        raise SetupError(
            f"{found} is Java {major}: Spark {_spark_version()} needs Java {MIN_JAVA} or newer (17 or 21)",
            "install a JDK 17 (Debian: apt-get install -y openjdk-17-jre-headless) and set JAVA_HOME to it",
        )
    return found


MIN_JAVA = 17  # Spark 4 dropped Java 8 and 11


def _spark_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyspark")
    except PackageNotFoundError:
        return "4"


@functools.lru_cache(maxsize=8)
def _java_major(java: str) -> int | None:
    """The major version `java -version` reports (``1.8.0_402`` is 8); None when it cannot tell."""
    import re
    import subprocess

    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    first = int(match.group(1))
    return int(match.group(2) or 0) if first == 1 else first


def user_cache_dir() -> Path:
    """The per-user lakeray cache: ``$LAKERAY_CACHE``, else ``$XDG_CACHE_HOME/lakeray``, else
    ``~/.cache/lakeray``. Shared by every project of the user; deleting it only costs a re-download."""
    if os.environ.get("LAKERAY_CACHE"):
        return Path(os.environ["LAKERAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lakeray"


def delta_jars_dir(settings: Settings) -> Path:
    """Where this profile's Delta jars live: ``spark.jars_dir`` when set (relative to the project), else
    ``<user cache>/jars/<folder named after the Maven coordinate>``: two lakeray versions pinning two
    Delta versions each keep their own set instead of re-resolving over each other."""
    explicit = settings.profile.spark.jars_dir
    if explicit:
        return Path(settings.resolve(explicit))
    return user_cache_dir() / "jars" / re.sub(r"[^A-Za-z0-9._-]+", "_", DELTA_PACKAGE)


def delta_jars(jars_dir: Path, package: str = DELTA_PACKAGE) -> list[str]:
    """The cached Delta jars (or ``package``'s); SetupError naming `lakeray setup` when they are missing."""
    marker = jars_dir / _MARKER
    jars = sorted(str(p) for p in jars_dir.glob("*.jar"))
    if not marker.is_file() or marker.read_text().strip() != package or not jars:
        flag = "" if package == DELTA_PACKAGE else " --object-store"
        raise SetupError(
            f"the {'Delta' if not flag else 'object-store connector'} jars ({package}) are not cached in {jars_dir}",
            f"run `lakeray setup{flag}` (`make setup` in the lakeray checkout) once, with access to Maven Central",
        )
    return jars


def object_store_package() -> str:
    """hadoop-aws at the Hadoop version pyspark ships (its AWS SDK bundle comes as a dependency, ~690 MB)."""
    import pyspark

    found = sorted(Path(pyspark.__file__).parent.glob("jars/hadoop-client-api-*.jar"))
    version = found[-1].name.removeprefix("hadoop-client-api-").removesuffix(".jar") if found else "3.5.0"
    return f"org.apache.hadoop:hadoop-aws:{version}"


def object_store_jars_dir(settings: Settings) -> Path:
    """``<user cache>/jars/<hadoop-aws coordinate>``, beside the Delta jars."""
    explicit = settings.profile.spark.jars_dir
    base = Path(settings.resolve(explicit)).parent if explicit else user_cache_dir() / "jars"
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", object_store_package())


def resolve_object_store_jars(jars_dir: Path) -> list[str]:
    """Cache hadoop-aws and its AWS SDK bundle (``lakeray setup --object-store``); a no-op when cached."""
    return resolve_delta_jars(jars_dir, package=object_store_package())


def resolve_delta_jars(jars_dir: Path, seeds: tuple[Path, ...] = (), package: str = DELTA_PACKAGE) -> list[str]:
    """Put the Delta jars in ``jars_dir``; a no-op when already there.

    The jars come from the first of ``seeds`` that holds this coordinate's complete set (an older
    per-project cache: no network needed), else from Maven Central through Spark's Ivy. Either way
    they are assembled in a temporary sibling folder, marked RESOLVED, and renamed into place in one
    step, so a process that resolves at the same time, or one killed half-way, never leaves a folder
    that looks complete but is not.
    """
    try:
        return delta_jars(jars_dir, package)
    except SetupError:
        pass
    jars_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{jars_dir.name}.tmp-", dir=jars_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would follow the rename
    try:
        seeded = next((seed for seed in seeds if _complete(seed, package)), None)
        if seeded is not None:
            for jar in seeded.glob("*.jar"):
                shutil.copy2(jar, staging / jar.name)
        else:
            _ivy_resolve(staging, package)
        (staging / _MARKER).write_text(package + "\n")
        _swap_into_place(staging, jars_dir, package)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename won
    return delta_jars(jars_dir, package)


def _complete(folder: Path, package: str = DELTA_PACKAGE) -> bool:
    try:
        delta_jars(folder, package)
    except SetupError:
        return False
    return True


def _ivy_resolve(into: Path, package: str = DELTA_PACKAGE) -> None:
    check_java()
    from pyspark.sql import SparkSession

    with tempfile.TemporaryDirectory(prefix="lakeray-ivy-") as ivy:
        spark = (
            SparkSession.builder.master("local[1]")
            .appName("lakeray-resolve-jars")
            .config("spark.jars.packages", package)
            .config("spark.jars.ivy", ivy)
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        spark.stop()
        resolved = list(Path(ivy, "jars").glob("*.jar"))
        group, artifact = package.split(":")[:2]
        if not any(p.name.startswith(f"{group}_{artifact}") for p in resolved):
            raise SetupError(f"Ivy did not resolve {package}", "check access to Maven Central")
        for jar in resolved:
            shutil.move(jar, into / jar.name)  # not a copy: the AWS SDK bundle alone is ~690 MB


def _swap_into_place(staging: Path, jars_dir: Path, package: str = DELTA_PACKAGE) -> None:
    """Rename ``staging`` to ``jars_dir``. Another process that got there first wins (its set is as good);
    an incomplete or outdated folder in the way is moved aside first, then deleted."""
    for _ in range(3):
        try:
            staging.rename(jars_dir)  # atomic; fails when jars_dir exists and is not empty
            return
        except OSError:
            if _complete(jars_dir, package):
                return
            if jars_dir.exists():
                aside = jars_dir.with_name(f".{jars_dir.name}.stale-{os.getpid()}")
                try:
                    jars_dir.rename(aside)
                except OSError:
                    continue  # someone else moved it: try again
                shutil.rmtree(aside, ignore_errors=True)
    raise SetupError(f"could not move the resolved Delta jars into {jars_dir}",
                     "check that the folder is writable, then run `lakeray setup` again")


def create_spark_session(settings: Settings) -> SparkSession:
    """Start (or return the process's running) Spark session for ``settings`` with Delta enabled."""
    check_java()
    jars = delta_jars(delta_jars_dir(settings))
    store = settings.profile.storage
    if store.is_object_store:
        from lakeray import storage

        # Fail here, in storage.timeout_s, with the setting named, not in a JVM stack trace minutes later.
        storage.check_access(settings.storage_root, store)
        jars += delta_jars(object_store_jars_dir(settings), object_store_package())
    from pyspark.sql import SparkSession

    cfg = settings.profile.spark
    builder = (
        SparkSession.builder.master(cfg.master)
        .appName(cfg.app_name)
        .config("spark.jars", ",".join(jars))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        # Ray reads these tables with delta-rs, which (via ray.data.read_delta) cannot read deletion vectors.
        .config("spark.databricks.delta.properties.defaults.enableDeletionVectors", "false")
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        # Delta's VACUUM lists and deletes files in this many Spark tasks (default 10,000): ~50 s per
        # VACUUM of even a tiny table on local[2]. The shuffle partition count is the cluster's width.
        .config("spark.sql.sources.parallelPartitionDiscovery.parallelism", str(cfg.shuffle_partitions))
        .config("spark.driver.memory", cfg.driver_memory)
        # The feature runner caches a job's output once for its quality checks and the write. Compressing
        # the cached columns (Spark's default) made that cache 5% smaller at 5M rows of mostly doubles
        # (648 vs 685 MiB) and its fill ~1.5 s (10%) slower on 2 cores. Set it back in spark.conf if the
        # memory matters more (string-heavy outputs compress better).
        .config("spark.sql.inMemoryColumnarStorage.compressed", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "true" if cfg.ui else "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.warehouse.dir", f"{settings.storage_root}/spark-warehouse")
        .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={_derby_home(settings)}")
    )
    if cfg.master.startswith("local"):
        # Python workers (the point-in-time join runs in them) must be this interpreter: the default
        # `python3` on PATH is not the venv and cannot import lakeray. PySpark reads only the
        # environment variable for this (not spark.pyspark.python). On a cluster, workers need lakeray
        # installed, like any library a PySpark UDF uses.
        import sys

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # After every commit Delta rebuilds the table's state in `snapshotPartitions` tasks (default 50):
    # ~4.5 s per write on local[2] whatever the data size (a 10-row write took 5.4 s, 0.9 s with 2), and
    # on a 2-host standalone cluster of 4 cores a 2,000-row feature job took 186/203 s with 50 and
    # 110/159 s with 4 (runs alternated on one cluster, machine loaded).
    # The useful width is the cores locally and the profile's shuffle width on a cluster, never above
    # Delta's 50 (a big cluster's 200 shuffle partitions would only add tasks to a small log replay).
    width = min(cfg.shuffle_partitions, os.cpu_count() or 1) if cfg.master.startswith("local") else \
        min(cfg.shuffle_partitions, 50)
    builder = builder.config("spark.databricks.delta.snapshotPartitions", str(max(1, width)))
    if store.is_object_store:
        from lakeray import storage

        for key, value in storage.spark_conf(store).items():
            builder = builder.config(key, value)
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _derby_home(settings: Settings) -> str:
    """Derby (the metastore's files) needs a local folder: beside the lakehouse, or in the temp folder
    when the lakehouse is on an object store (a ``s3://`` value would make a local folder named ``s3:``)."""
    from lakeray import storage

    root = settings.storage_root
    return storage.join(root, "derby") if storage.is_local(root) else storage.join(tempfile.gettempdir(), "lakeray-derby")


@contextlib.contextmanager
def spark_session(settings: Settings) -> Iterator[SparkSession]:
    """:func:`create_spark_session` for one command; stopped on exit only if this call started it.

    A CLI command run inside a process that already has a session (a notebook, a test session,
    an orchestrator's worker) gets that session back from ``getOrCreate`` and must not stop it:
    stopping would kill the caller's Spark. Checked both ways because ``getActiveSession`` is per
    thread while ``getOrCreate`` also returns the process's default session from another thread.
    """
    from pyspark.sql import SparkSession

    existed = SparkSession.getActiveSession() is not None or getattr(SparkSession, "_instantiatedSession", None) \
        is not None
    spark = create_spark_session(settings)
    try:
        yield spark
    finally:
        if not existed:
            spark.stop()
