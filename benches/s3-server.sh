# Sourced by the S3 benchmarks: `start_s3 WORKDIR [DELAY_MS]` starts a SeaweedFS S3 server on 127.0.0.1:$port
# (data in WORKDIR) and, given DELAY_MS, benches/lagproxy.py in front of it on $lag (remote-storage latency on
# loopback); both stop, and WORKDIR is removed, when the script exits.
port=19302 lag=19310
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
start_s3() {
  local work=$1 delay=${2:-}
  weed mini -dir="$work/sw" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port=$port -master.port=19433 -volume.port=19440 \
    -filer.port=19888 -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 > "$work/weed.log" 2>&1 &
  local weed_pid=$! pids=$!
  if [ -n "$delay" ]; then
    python3 benches/lagproxy.py $lag $port "$delay" > "$work/proxy.log" 2>&1 &
    pids="$pids $!"
  fi
  # weed mini takes seconds to stop on SIGTERM: kill it for good before its directory goes.
  trap "kill $pids 2>/dev/null; sleep 1; kill -9 $weed_pid 2>/dev/null; rm -rf '$work'" EXIT
  for _ in $(seq 1 120); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.5; done
  sleep 2
}
