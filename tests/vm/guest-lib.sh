# Shell helpers for VM tier guest scripts: run CNI commands, check results, print verdicts.
#
# Sourced by busybox sh before the test script.  Verdicts are console lines the host
# parses: "CASE <name> PASS|FAIL <detail>" and "METRIC <name> <number>".
# Call iproute2 as $IP: busybox's own ip applet lacks netns and ipvlan support.

IP=/sbin/ip
CNI_TIMEOUT=${CNI_TIMEOUT:-60}

# now_ms: milliseconds since boot (10 ms resolution, from /proc/uptime).
now_ms() {
    read _uptime _rest < /proc/uptime
    _uptime=${_uptime%.*}${_uptime#*.}
    while [ "${_uptime#0}" != "$_uptime" ]; do _uptime=${_uptime#0}; done
    echo $(( ${_uptime:-0} * 10 ))
}

# one_line TEXT...: TEXT squeezed onto one bounded line, for a verdict's detail.
one_line() {
    printf '%s' "$*" | tr '\n\t' '  ' | tr -s ' ' | cut -c1-600
}

pass() { _verdict=$1; shift; echo "CASE $_verdict PASS $(one_line "$*")"; }
fail() { _verdict=$1; shift; echo "CASE $_verdict FAIL $(one_line "$*")"; }
metric() { echo "METRIC $1 $2"; }

# cni COMMAND PLUGIN CONFIG_FILE: run PLUGIN with CNI_COMMAND=COMMAND and the config on
# stdin, with the exported CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH, CNI_ARGS.
# Sets CNI_RC, CNI_OUT (stdout), CNI_ERR (stderr), CNI_MS (wall time); stdout is also
# left in /tmp/cni.out for with_prev_result.
cni() {
    _started=$(now_ms)
    CNI_COMMAND=$1 timeout "$CNI_TIMEOUT" "$2" < "$3" > /tmp/cni.out 2> /tmp/cni.err
    CNI_RC=$?
    CNI_MS=$(( $(now_ms) - _started ))
    CNI_OUT=$(cat /tmp/cni.out)
    CNI_ERR=$(cat /tmp/cni.err)
}

# cni_report: the last command's outcome, for a verdict's detail.
cni_report() { echo "rc=$CNI_RC ms=$CNI_MS out=$CNI_OUT err=$CNI_ERR"; }

# expect_ok NAME: PASS when the last cni command exited 0.
expect_ok() {
    if [ "$CNI_RC" -eq 0 ]; then pass "$1" "ms=$CNI_MS"; else fail "$1" "expected success: $(cni_report)"; fi
}

# expect_error NAME [CODE]: PASS when the last cni command failed (with CNI error CODE).
expect_error() {
    if [ "$CNI_RC" -eq 0 ]; then
        fail "$1" "expected an error: $(cni_report)"
    elif [ -n "$2" ] && ! echo "$CNI_OUT" | grep -Eq "\"code\": *$2[,} ]"; then
        fail "$1" "expected error code $2: $(cni_report)"
    else
        pass "$1" "$(cni_report)"
    fi
}

# expect_match NAME TEXT REGEX...: PASS when every extended REGEX matches somewhere in TEXT.
expect_match() {
    _name=$1 _text=$2
    shift 2
    for _pattern in "$@"; do
        if ! printf '%s\n' "$_text" | grep -Eq -- "$_pattern"; then
            fail "$_name" "no match for /$_pattern/ in: $_text"
            return 1
        fi
    done
    pass "$_name"
}

# expect_cmd_fails NAME COMMAND...: PASS when COMMAND exits non-zero (e.g. a link is gone).
expect_cmd_fails() {
    _name=$1
    shift
    if _output=$("$@" 2>&1); then fail "$_name" "still succeeds: $* -> $_output"; else pass "$_name"; fi
}

# with_prev_result CONFIG_FILE RESULT_FILE: CONFIG_FILE's JSON object with
# "prevResult" set to RESULT_FILE's JSON (the config must end with its closing brace).
with_prev_result() {
    _config=$(cat "$1")
    printf '%s,"prevResult":%s}\n' "${_config%\}}" "$(cat "$2")"
}

# make_master NAME: an up dummy link standing in for a Slingshot hsnN interface.
make_master() { $IP link add "$1" type dummy && $IP link set "$1" up; }

# link_details NETNS IFNAME: `ip -d addr` of IFNAME inside NETNS (empty when missing).
link_details() { $IP -n "$1" -d addr show dev "$2" 2>&1; }
