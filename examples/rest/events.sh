#!/usr/bin/env bash
# Events over the WMS's REST gateway with curl and jq only -- no base64 anywhere: events are
# published as "json" or "text" and received back with payload_format PAYLOAD_FORMAT_DECODED.
#
#   EWMS_HTTP=http://127.0.0.1:8080 EWMS_TOKEN=... examples/rest/events.sh
#
# Creates a small workflow, publishes three JSON events and one text event to its "out" queue,
# receives them, prints them, acks them, checks the queue's counters and finishes the workflow.
# It uses the task's output queue because no pilot consumes that one: the script is its only
# reader even when a TMS runs the workflow's workers (as under `ewms up`).
set -euo pipefail

: "${EWMS_HTTP:?set EWMS_HTTP to the base URL of the WMS HTTP face, e.g. http://127.0.0.1:8080}"
: "${EWMS_TOKEN:?set EWMS_TOKEN to a user (or admin) token}"
EWMS_HTTP=${EWMS_HTTP%/}

# api METHOD PATH [JSON]: one REST call; its JSON answer on stdout, or the error (a google.rpc.Status
# as JSON) on stderr and a non-zero exit.
api() {
    local method=$1 path=$2 body=${3-} out
    local args=(-sS --fail-with-body -X "$method" -H "Authorization: Bearer $EWMS_TOKEN")
    if [ -n "$body" ]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    out=$(curl "${args[@]}" "$EWMS_HTTP$path") || {
        echo "$method $path failed: $out" >&2
        return 1
    }
    printf '%s\n' "$out"
}

# 1. A workflow: one task at location "local" reading queue "in" and writing queue "out".
WF=$(api POST /v1/workflows '{
  "public_queue_aliases": ["in", "out"],
  "tasks": [{
    "cluster_locations": ["local"],
    "input_queue_aliases": ["in"],
    "output_queue_aliases": ["out"],
    "task_args": "cp {{INFILE}} {{OUTFILE}}",
    "n_workers": 1,
    "worker_config": {"do_transfer_worker_stdouterr": false, "max_worker_runtime": 600,
                      "n_cores": 1, "priority": 50, "worker_disk": "1G", "worker_memory": "512M"}
  }]
}' | jq -r .workflow.workflow_id)
Q=$(api GET "/v1/workflows/$WF/queues" | jq -er '.queues[] | select(.alias == "out") | .queue_id')
echo "workflow $WF, queue $Q"

# 2. Publish: JSON events as plain JSON ("json"), a text event as a plain string ("text").
events=$(jq -n --arg line "hello from curl" '{events: [
    {json: {sensor: "a", raw: 1}},
    {json: {sensor: "b", raw: 2.5}},
    {json: {sensor: "c", raw: null, tags: ["x", "y"]}},
    {text: $line}
]}')
api POST "/v1/queues/$Q/events" "$events" | jq -c '{published: .event_ids}'

# 3. Receive them decoded (json or text instead of base64 payload), until all four are here.
deliveries='[]'
while [ "$(jq length <<<"$deliveries")" -lt 4 ]; do
    got=$(api POST "/v1/queues/$Q/actions/receive" \
        '{"max_events": 10, "wait_seconds": 10, "payload_format": "PAYLOAD_FORMAT_DECODED"}' |
        jq '.deliveries // []')
    if [ "$(jq length <<<"$got")" -eq 0 ]; then
        echo "no events within 10 s" >&2
        exit 1
    fi
    deliveries=$(jq -n --argjson a "$deliveries" --argjson b "$got" '$a + $b')
done
jq -c '.[].event | {content_type} + (if has("json") then {json} else {text} end)' <<<"$deliveries"

# 4. Ack them by ack id; then the queue's counters show them acked (int64 counters are JSON
# strings, and zero counters may be left out).
acks=$(jq '{ack_ids: [.[].ack_id]}' <<<"$deliveries")
api POST "/v1/queues/$Q/actions/ack" "$acks" >/dev/null
api GET "/v1/queues/$Q/stats" | jq -e -r '
    {published: (.published // "0" | tonumber), acked: (.acked // "0" | tonumber),
     ready: (.ready // "0" | tonumber), in_flight: (.in_flight // "0" | tonumber)}
    | if .acked == 4 and .ready == 0 and .in_flight == 0
      then "acked \(.acked) of \(.published) published; none ready or in flight"
      else error("queue counters: \(.)") end'

# 5. Done: finishing the workflow stops its workers.
api POST "/v1/workflows/$WF/actions/finished" '{}' >/dev/null
echo "finished $WF"
