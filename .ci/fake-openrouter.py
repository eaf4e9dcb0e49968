"""A loopback OpenAI-compatible endpoint for `.ci/image-check`: it answers
GET /api/v1/key and GET /api/v1/models for one key, and prints its port."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = sys.argv[1]
MODELS = {"data": [{"id": "test/tools", "context_length": 100000, "supported_parameters": ["tools"]}]}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.reply(401, {"error": {"code": 401, "message": "No auth credentials found"}})
        elif self.path == "/api/v1/key":
            self.reply(200, {"data": {"label": "ci"}})
        elif self.path == "/api/v1/models":
            self.reply(200, MODELS)
        else:
            self.reply(404, {"error": {"code": 404, "message": "not found"}})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
