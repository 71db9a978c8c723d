"""`python -m stream_supervisor` is `stream-supervisor`."""

from .cli import main

if __name__ == "__main__":
    main()
