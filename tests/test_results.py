import datetime

from compress.results import command_line, report_header, write_result_report


def test_report_opens_with_command_date_cpu_and_versions(tmp_path):
    machine = {"cpu": "AMD EPYC", "cpu_family": "26", "cpu_model_number": "2", "isa": ["avx2", "avx512_vnni"],
               "threads": 2}
    path = write_result_report(tmp_path / "r" / "x.md", "Bench", "| a |\n|---|\n| 1 |\n",
                               command="python compress.py --recipe r.yaml", machine=machine)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Bench"
    assert lines[2] == "- command: `python compress.py --recipe r.yaml`"
    assert lines[3] == f"- date: {datetime.date.today().isoformat()}"
    assert lines[4] == "- CPU: AMD EPYC (family 26 model 2; avx2, avx512_vnni), 2 threads"
    assert lines[5].startswith("- packages: python ") and "torch " in lines[5]
    assert lines[-1] == "| 1 |"
    assert [p.name for p in path.parent.iterdir()] == ["x.md"]  # no temporary file left


def test_command_line_quotes_and_names_python():
    assert command_line(["compress.py", "--set", "data.root=a b"]) == "python compress.py --set 'data.root=a b'"
    assert report_header("T", "c", {"cpu": "X", "isa": []}).count("\n- ") == 4


def test_transcript_publishes_what_it_printed(tmp_path, capsys):
    from compress.results import Transcript

    out = Transcript()
    out.say("variant  fastest ms")
    out.say("pad4         0.250")
    out.publish(None, "T")  # no path: nothing written
    assert not list(tmp_path.iterdir())
    out.publish(tmp_path / "t.md", "Rewrites")
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["variant  fastest ms", "pad4         0.250"] and printed[2] == f"report: {tmp_path / 't.md'}"
    text = (tmp_path / "t.md").read_text()
    assert text.startswith("# Rewrites\n") and text.endswith("```\nvariant  fastest ms\npad4         0.250\n```\n")
