"""Put the Hadoop object-store connector for a cloud into pyspark's jars folder ($SPARK_HOME/jars).

    python cluster/scripts/object_store_jars.py aws [gcp] [azure]

aws → hadoop-aws (s3a://) with its AWS SDK bundle, azure → hadoop-azure (abfss://), both at the Hadoop
version pyspark bundles (hadoop-client-api-<version>.jar), resolved through Spark's own Ivy from Maven
Central; gcp → Google's shaded gcs-connector (gs://), one jar. $SPARK_HOME/jars is on the classpath of
every Spark process on the node (master, workers, drivers), so nothing else needs configuring.

A stop-gap for the cluster images until `lakeray setup` caches hadoop-aws next to the Delta jars
(issue 14). Idempotent: a connector already in the folder is not fetched again.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

_GCS_CONNECTOR = ("https://repo1.maven.org/maven2/com/google/cloud/bigdataoss/gcs-connector/hadoop3-2.2.26/"
                  "gcs-connector-hadoop3-2.2.26-shaded.jar")


def _spark_jars() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def _hadoop_version(jars: Path) -> str:
    found = sorted(jars.glob("hadoop-client-api-*.jar"))
    if not found:
        sys.exit(f"no hadoop-client-api jar in {jars}: is this pyspark's jars folder?")
    return found[-1].name.removeprefix("hadoop-client-api-").removesuffix(".jar")


def _ivy(package: str, into: Path) -> None:
    from pyspark.sql import SparkSession

    with tempfile.TemporaryDirectory(prefix="lakeray-ivy-") as ivy:
        spark = (SparkSession.builder.master("local[1]").appName("lakeray-object-store-jars")
                 .config("spark.jars.packages", package).config("spark.jars.ivy", ivy)
                 .config("spark.ui.enabled", "false").getOrCreate())
        spark.stop()
        for jar in Path(ivy, "jars").glob("*.jar"):
            if not (into / jar.name).exists():
                shutil.copy2(jar, into / jar.name)


def main(clouds: list[str]) -> None:
    jars = _spark_jars()
    hadoop = _hadoop_version(jars)
    for cloud in clouds:
        if cloud == "aws" and not list(jars.glob("hadoop-aws-*.jar")):
            _ivy(f"org.apache.hadoop:hadoop-aws:{hadoop}", jars)
        elif cloud == "azure" and not list(jars.glob("hadoop-azure-*.jar")):
            _ivy(f"org.apache.hadoop:hadoop-azure:{hadoop}", jars)
        elif cloud == "gcp" and not list(jars.glob("gcs-connector-*.jar")):
            target = jars / _GCS_CONNECTOR.rsplit("/", 1)[1]
            with urllib.request.urlopen(_GCS_CONNECTOR, timeout=300) as response, \
                    tempfile.NamedTemporaryFile(dir=jars, delete=False) as part:
                shutil.copyfileobj(response, part)
            Path(part.name).rename(target)  # atomic: a killed download leaves no half jar on the classpath
        elif cloud not in ("aws", "azure", "gcp"):
            sys.exit(f"unknown cloud {cloud!r}: aws, gcp or azure")
        print(f"{cloud}: connector in {jars}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["aws"])
