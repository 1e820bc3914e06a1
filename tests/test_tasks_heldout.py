"""Held-out text: named corpora resolve under the shared data folder; WikiText splits into its 60 articles."""
import pytest

from data.errors import DataError
from data import tasks
from data.tasks import heldout


@pytest.mark.parametrize("name", ["wikitext2_valid", "wikitext2_test"])
def test_wikitext_splits_into_its_articles(shared_data_dir, name):
  text = heldout.load_text(name)
  docs = heldout.documents(text)
  assert len(docs) == 60  # Merity et al. 2016, table 1
  assert "".join(docs) == text
  assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs[1:])
  assert docs[0].lstrip(" \n").startswith("= ")
  assert text == heldout.load_text(shared_data_dir / "text" / f"{name}.txt")


def test_tinyshakespeare_is_one_document(shared_data_dir):
  text = heldout.load_text("tinyshakespeare")
  assert text.startswith("First Citizen:")
  assert heldout.documents(text) == [text]


def test_documents_by_hand():
  text = (" \n = A = \n \n Intro .\n \n = = Section = = \n \n More .\n"
          " = x = y = \n not a title : no blank line follows \n \n = B = \n \n Text .\n")
  assert heldout.documents(text) == [
      " \n = A = \n \n Intro .\n \n = = Section = = \n \n More .\n"
      " = x = y = \n not a title : no blank line follows \n \n",
      " = B = \n \n Text .\n"]
  assert heldout.documents("no titles") == ["no titles"]
  assert heldout.documents("") == []


def test_bad_paths(tmp_path, monkeypatch):
  with pytest.raises(DataError, match="file not found"):
    heldout.load_text(tmp_path / "missing.txt")
  empty = tmp_path / "empty.txt"
  empty.write_text(" \n")
  with pytest.raises(DataError, match="empty"):
    heldout.load_text(empty)
  monkeypatch.setenv("SHARED_DATA", str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="nowhere: shared data folder not found"):
    tasks.shared_data_dir()
  with pytest.raises(DataError, match="shared data folder not found"):
    heldout.load_text("wikitext2_valid")
