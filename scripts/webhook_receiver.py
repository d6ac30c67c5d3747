"""A local receiver for the demo: accepts Standard Webhooks POSTs, checks
each signature against the demo's secret, and appends one line per event
to a log. Usage: webhook_receiver.py PORT_FILE LOG_FILE WHSEC_SECRET"""
import base64
import hashlib
import hmac
import http.server
import json
import sys

port_file, log_file, secret = sys.argv[1], sys.argv[2], sys.argv[3]
key = base64.b64decode(secret.removeprefix("whsec_"))


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg_id = self.headers.get("webhook-id", "")
        timestamp = self.headers.get("webhook-timestamp", "")
        expected = base64.b64encode(
            hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        ).decode()
        signed = any(
            hmac.compare_digest(sig.split(",", 1)[-1], expected)
            for sig in self.headers.get("webhook-signature", "").split()
        )
        event = json.loads(body)
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(
                f"{event['type']:<24} member {event['data']['member']['id']:<4} "
                f"{json.dumps(event['data']['trigger_data'])}  "
                f"signature {'ok' if signed else 'BAD'}  webhook-id {msg_id}\n"
            )
        self.send_response(204 if signed else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
with open(port_file, "w", encoding="utf-8") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
