#!/usr/bin/env bash
# Scans log files for email addresses and phone numbers: personal data never
# goes to logs. Used by scripts/test.sh on the logs of the whole test run
# (the code under test at debug level, and every run of the binary).
# Usage: scan-logs.sh FILE_OR_DIR...
set -euo pipefail
email='[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}'
# +country code and at least 7 more digits (spaces allowed), or a national
# number written with a leading 0 (030 1234567) standing on its own: not
# inside a word, so the hex groups of a message id (…-b084-72615a…) are no
# number.
phone='\+[1-9][0-9 ]{7,17}[0-9]|(^|[^0-9A-Za-z./:_-])0[1-9][0-9]{1,3}[ /-][0-9]{5,8}([^0-9A-Za-z]|$)'
files=()
for path in "$@"; do
  [[ -e $path ]] || continue
  if [[ -d $path ]]; then
    while IFS= read -r -d '' file; do files+=("$file"); done < <(find "$path" -type f -name '*.log' -print0)
  else
    files+=("$path")
  fi
done
if [[ ${#files[@]} -eq 0 ]]; then
  echo "scan-logs: no log files under $*" >&2
  exit 1
fi
lines=$(cat "${files[@]}" | wc -l)
if grep -HnE -e "$email" -e "$phone" "${files[@]}" >/tmp/scan-logs.$$ 2>/dev/null; then
  echo "scan-logs: personal data in the logs of the test run:" >&2
  head -20 /tmp/scan-logs.$$ >&2
  rm -f /tmp/scan-logs.$$
  exit 1
fi
rm -f /tmp/scan-logs.$$
echo "scan-logs: ${#files[@]} log file(s), $lines line(s): no email address or phone number"
