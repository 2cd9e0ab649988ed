import sys
from pathlib import Path

# Test helpers (oracle, eventlog, tiny model builders) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
