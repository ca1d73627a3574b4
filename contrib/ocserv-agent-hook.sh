#!/bin/sh
# ocserv connect-/disconnect-/host-update-script: runs the ocserv-agent-hook binary installed in
# the same directory as this file, with the same arguments. A shell script rather than the binary
# itself because ocserv-fw (used for restrict-user-to-routes/ports) runs the configured script as
# `/bin/sh "$OCSERV_NEXT_SCRIPT"`. Settings come from OCSERV_AGENT_HOOK_SOCKET,
# OCSERV_AGENT_HOOK_TIMEOUT and OCSERV_AGENT_HOOK_FAIL_MODE in ocserv's environment.
exec "${0%/*}/ocserv-agent-hook" "$@"
