"""Points the real tfds CIFAR-10 builder at another copy of cifar-10-binary.tar.gz, for tests.

tfds reads the archive's URL from `Cifar10._cifar_info` and verifies every download against
the size and SHA-256 registered for that URL in `Cifar10.url_infos` (its url_checksums file).
A test archive has its own checksum, so both are replaced, on the class, for this process only;
the rest of the builder (download manager, checksum check, extraction, example generation,
array_record writing) is tfds' own.

In-process: `undo = redirect_cifar10(url, size, sha256)`. For main.py in a child process:
    python tests/tfds_redirect.py URL SIZE SHA256 main.py --workdir=... --config=...
runs main.py as `python main.py --workdir=... --config=...` would, with the redirect in place.
"""
import runpy
import sys
from collections.abc import Callable

ARCHIVE_NAME = "cifar-10-binary.tar.gz"


def redirect_cifar10(url: str, size: int, sha256: str) -> Callable[[], None]:
    """Makes tfds' cifar10 builder download `url` and expect (size, sha256); returns the undo."""
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.image_classification import cifar

    builder = cifar.Cifar10
    saved = {name: builder.__dict__[name] for name in ("_cifar_info", "url_infos")
             if name in builder.__dict__}
    original_info = builder._cifar_info  # the property object
    builder._cifar_info = property(lambda self: original_info.fget(self)._replace(url=url))
    builder.url_infos = {url: checksums.UrlInfo(size=size, checksum=sha256,
                                                filename=ARCHIVE_NAME)}

    def undo() -> None:
        for name in ("_cifar_info", "url_infos"):
            if name in saved:
                setattr(builder, name, saved[name])
            else:
                delattr(builder, name)

    return undo


if __name__ == "__main__":
    url, size, sha256, script = sys.argv[1:5]
    redirect_cifar10(url, int(size), sha256)
    sys.argv = [script, *sys.argv[5:]]
    runpy.run_path(script, run_name="__main__")
