"""The seminorm benchmark's Speech Commands part: absent or unreadable data is a note, never a lost report.

(The full benchmark runs for ~25 minutes; its figures are in docs/benchmarks.md.)
"""

from __future__ import annotations

from nde_zoo.bench.seminorm import TOLERANCES, _part_speech_commands
from nde_zoo.datamodules import SpeechCommandsDataModule

KWARGS = dict(seeds=[0], tolerances=TOLERANCES[:1], epochs=1, batch_sizes=[4], sweep_series=4)


def test_missing_speech_commands_is_skipped_with_how_to_get_it(tmp_path):
    results, tables, notes, verdicts = _part_speech_commands(str(tmp_path / "nowhere"), KWARGS)
    assert results is None and tables == [] and verdicts == []
    assert notes == [f"Speech Commands (the paper's set) skipped: its word folders are not under "
                     f"{tmp_path / 'nowhere'} (`data=speech_commands data.download=true` fetches 2.3 GB "
                     f"when online)."]


def test_unreadable_speech_commands_is_a_note_naming_the_file(tmp_path):
    for word in SpeechCommandsDataModule().words:
        (tmp_path / word).mkdir()
    (tmp_path / "yes" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    results, tables, notes, verdicts = _part_speech_commands(str(tmp_path), KWARGS)
    assert results is None and tables == [] and verdicts == []
    assert len(notes) == 1 and notes[0].startswith(f"Speech Commands under {tmp_path} could not be read, skipped:")
    assert "broken.wav" in notes[0]
