#!/usr/bin/env bash
# Start or stop this node's Spark standalone daemons from the pyspark install (no separate Spark download).
#
#   spark-node.sh master              a Spark master on this node's cluster-network address, port 7077
#   spark-node.sh worker MASTER_URL   a Spark worker that registers with MASTER_URL (spark://HOST:7077)
#   spark-node.sh stop                stop both (a no-op when neither runs)
#
# pyspark's wheel ships sbin/spark-daemon.sh but not start-master.sh / start-worker.sh, which are thin
# wrappers around it: this runs the same classes through spark-daemon.sh, with the same logs and pid files
# ($SPARK_LOG_DIR, $SPARK_PID_DIR). The master binds to the node's private address only, never 0.0.0.0:
# clients outside the cluster network reach it through the cloud's firewall rules, which do not open 7077.
# Worker size: Spark's own SPARK_WORKER_CORES / SPARK_WORKER_MEMORY (default: all cores, RAM - 1 GiB;
# Ray shares the node, so set them on nodes that run heavy Ray work).
set -euo pipefail

: "${SPARK_HOME:=$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}"
export SPARK_HOME
export SPARK_LOG_DIR="${SPARK_LOG_DIR:-/tmp/spark-logs}" SPARK_PID_DIR="${SPARK_PID_DIR:-/tmp/spark-pids}"
mkdir -p "$SPARK_LOG_DIR" "$SPARK_PID_DIR"
# The address other nodes reach this one at: Ray's node IP when the launcher exported it, else the first
# address of the host (the VPC/VNet private address on AWS, GCP and Azure; the pod IP on Kubernetes).
NODE_IP="${SPARK_LOCAL_IP:-${MY_POD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}}"
NODE_IP="${NODE_IP:-$(hostname -i | awk '{print $1}')}"
export SPARK_LOCAL_IP="$NODE_IP"
daemon="$SPARK_HOME/sbin/spark-daemon.sh"

case "${1:-}" in
  master)
    "$daemon" start org.apache.spark.deploy.master.Master 1 \
      --host "$NODE_IP" --port "${SPARK_MASTER_PORT:-7077}" --webui-port "${SPARK_MASTER_WEBUI_PORT:-8080}"
    echo "spark master: spark://$NODE_IP:${SPARK_MASTER_PORT:-7077}"
    ;;
  worker)
    master_url="${2:?usage: spark-node.sh worker spark://HOST:7077}"
    # Application folders (executor logs, shipped jars) outside the venv's pyspark package, where Spark
    # puts them by default and nothing removes them; finished applications' folders go after 3 days.
    export SPARK_WORKER_DIR="${SPARK_WORKER_DIR:-/tmp/lakeray-spark-work}"
    export SPARK_WORKER_OPTS="${SPARK_WORKER_OPTS:-} -Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.appDataTtl=259200"
    "$daemon" start org.apache.spark.deploy.worker.Worker 1 \
      --host "$NODE_IP" --webui-port "${SPARK_WORKER_WEBUI_PORT:-8081}" "$master_url"
    ;;
  stop)
    "$daemon" stop org.apache.spark.deploy.worker.Worker 1 || true
    "$daemon" stop org.apache.spark.deploy.master.Master 1 || true
    ;;
  *)
    echo "usage: spark-node.sh master | worker spark://HOST:7077 | stop" >&2
    exit 2
    ;;
esac
