"""An HTTP server on 127.0.0.1 for the download tests: started on a thread, stopped on exit."""
import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serving(httpd: http.server.HTTPServer) -> Iterator[http.server.HTTPServer]:
    """Serve `httpd` (bound to 127.0.0.1) on a thread; `httpd.url` is its base URL."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
