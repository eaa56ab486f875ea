"""common: facts both sides of the VM boundary share (host runtime and guest agent).

Pure data and pure functions only: no I/O, no third-party imports, so the guest agent can
import it at no start-up cost. The one exception is `common.lazyimport`, the start-up
import policy both sides install in their entry points. Every other package may import
it; it imports nothing of the project.
"""
