#!/usr/bin/env python
"""Developer tool: the docs site and the README, built offline from the notebooks with their outputs.

Not part of the research package. `make docs` runs `python tools/build_docs.py docs`, `make readme` runs
`python tools/build_docs.py readme`. Quarto cannot be installed here, so instead of `nbdev_docs` this uses
nbdev's own doc processors and mkdocs-material + mkdocs-jupyter.
"""
from __future__ import annotations
import contextlib, json, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import nbformat
from mm_research.core import atomic_write, project_root, runs_root

# The concern folders of nbs/ and their sidebar sections, from the lowest rank to the highest (imports point down).
CONCERNS = {"structure": "Structure", "memory": "Memory", "speech": "Speech", "llava": "LLaVA", "pruning": "Pruning",
            "gated": "Gated BLIP-2"}
SECTIONS = ("Home", "Ground floor", *CONCERNS.values(), "Running", "Experiments")
_RE_SKIP = re.compile(r"^([_.].*|experiments)$")  # folders without library notebooks, as for `make test-nbs`

def nbs_folder(folder: str | Path | None = None) -> Path:
    "The notebooks folder: `folder`, else the project's nbs/."
    return Path(folder or (project_root() or Path.cwd())/"nbs")

def library_notebooks(folder: str | Path | None = None) -> list[Path]:
    "Every library notebook under `folder` (nbs/), recursively: not in experiments/ or a folder named `_*` or `.*`."
    folder = nbs_folder(folder)
    return sorted(p for p in folder.rglob("[0-9]*.ipynb")
                  if not any(_RE_SKIP.match(d) for d in p.relative_to(folder).parts[:-1]))

def notebook_section(nb: Path, folder: str | Path | None = None) -> str:
    "The sidebar section of notebook `nb` of `folder`: Home, Ground floor, its concern, Running or Experiments."
    rel = Path(nb).relative_to(nbs_folder(folder))
    if rel.parts == ("index.ipynb",): return "Home"
    if len(rel.parts) > 1:
        return "Experiments" if rel.parts[0] == "experiments" else CONCERNS.get(rel.parts[0], rel.parts[0])
    return "Running" if rel.name[:2] >= "90" else "Ground floor"  # flat: the ground floor 00-89, the top 90-99

def _section_rank(section: str) -> float:
    "Where `section` sits in the sidebar; a concern folder not in CONCERNS goes after the known ones."
    return SECTIONS.index(section) if section in SECTIONS else SECTIONS.index("Running") - 0.5

def docs_sections(notebooks: list[Path] | None = None, folder: str | Path | None = None) -> dict[str, list[Path]]:
    "`notebooks` (default: index, the library notebooks and the experiments) by sidebar section, in sidebar order."
    folder = nbs_folder(folder)
    if notebooks is None:
        home = [folder/"index.ipynb"] if (folder/"index.ipynb").exists() else []
        notebooks = home + library_notebooks(folder) + sorted((folder/"experiments").glob("[0-9]*.ipynb"))
    sections = {}
    for nb in sorted(notebooks, key=lambda p: (_section_rank(notebook_section(p, folder)), notebook_section(p, folder),
                                               Path(p).relative_to(folder).as_posix())):
        sections.setdefault(notebook_section(nb, folder), []).append(Path(nb))
    return sections

def docs_notebooks(folder: str | Path | None = None) -> list[Path]:
    "The notebooks of the site in sidebar order: index, the library notebooks by concern, then the experiments."
    return [nb for nbs in docs_sections(folder=folder).values() for nb in nbs]

def notebook_heading(nb: str | Path) -> tuple[str, str]:
    "The `# title` of notebook `nb` and the first line of its `> description` ('' if none), as nbdev reads them."
    for c in json.loads(Path(nb).read_text())["cells"]:
        text = "".join(c["source"])
        if c["cell_type"] != "markdown" or "#" not in text: continue
        title = re.search(r"^#\s+(\S.*?)\s*$", text, re.MULTILINE)
        if not title: continue
        description = re.search(r"^>\s+(\S.*?)\s*$", text, re.MULTILINE)
        return title.group(1), description.group(1) if description else ""
    return Path(nb).stem, ""

def page_file(nb: Path, folder: str | Path | None = None) -> str:
    "The site page of notebook `nb`: its folder under nbs/ and nbdev's page name (`pruning/01_fastv`: `pruning/fastv`)."
    from nbdev.doclinks import _nbpath2html  # nbdev's own name, so that its links to API names find the page
    rel = Path(nb).relative_to(nbs_folder(folder))
    return (rel.parent/_nbpath2html(Path(rel.name)).with_suffix(".ipynb").name).as_posix()

def page_title(nb: Path) -> str:
    "The sidebar title of notebook `nb`: its number and its title (Home for the index)."
    return "Home" if Path(nb).stem == "index" else f"{Path(nb).stem.split('_')[0]} {notebook_heading(nb)[0]}"

def site_nav(notebooks: list[Path] | None = None, folder: str | Path | None = None) -> list[dict]:
    "The mkdocs nav of `notebooks` (default: every one): Home, then a section per group, the experiments last."
    nav = []
    for section, nbs in docs_sections(notebooks, folder).items():
        pages = [{page_title(nb): page_file(nb, folder)} for nb in nbs]
        nav += pages if section == "Home" else [{section: pages}]
    return nav

def latest_reproduction() -> Path | None:
    "The newest finished `mmr reproduce` folder under runs/reproduce/, or None."
    done = sorted(p.parent for p in (runs_root()/"reproduce").glob("*/results.json"))
    return done[-1] if done else None

_RE_NOEVAL = re.compile(r"^#\|\s*eval:\s*false", re.MULTILINE | re.IGNORECASE)

def runnable_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    "`nb` without the cells papermill must not run (`#| eval: false`, `nbdev_export()`)."
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and
                (_RE_NOEVAL.search(c.source) or "nbdev_export()" in c.source))]
    return nb

@contextlib.contextmanager
def docs_env(runs: Path | None):
    "Run folders of executed notebooks under `runs` (None: the project's runs/), library warnings off the pages."
    saved = {k: os.environ.get(k) for k in ("MMR_RUNS", "PYTHONWARNINGS")}
    os.environ.update(MMR_RUNS=str(runs or runs_root()),
                      PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning")
    try: yield
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

def _execute(src: Path, dst: Path, timeout: int = 900) -> Path:
    import papermill as pm
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp)/src.name
        nbformat.write(runnable_copy(nbformat.read(src, as_version=4)), inp)
        pm.execute_notebook(str(inp), str(dst), kernel_name="python3", cwd=str(src.parent), progress_bar=False,
                            execution_timeout=timeout)
    return dst

def execute_for_docs(src: str | Path, dst: str | Path, timeout: int = 900, scratch_runs: bool = True) -> Path:
    "Execute notebook `src` with papermill (run folders in a scratch folder) and save the result at `dst`."
    with tempfile.TemporaryDirectory() as tmp, docs_env(Path(tmp)/"runs" if scratch_runs else None):
        return _execute(Path(src), Path(dst), timeout)

def executed_path(nb: Path, dst: Path, folder: str | Path | None = None) -> Path:
    "Where notebook `nb` of `folder` (nbs/) goes executed in `dst`: under its folder, so equal names stay apart."
    folder = nbs_folder(folder)
    return dst/(Path(nb).relative_to(folder) if Path(nb).is_relative_to(folder) else Path(nb).name)

def execute_all(notebooks: list[Path], dst: Path, workers: int = 2) -> dict[Path, Path]:
    "Execute `notebooks` into `dst`, `workers` kernels at a time (run folders in a scratch folder)."
    from concurrent.futures import ThreadPoolExecutor
    with tempfile.TemporaryDirectory() as tmp, docs_env(Path(tmp)/"runs"), ThreadPoolExecutor(workers) as pool:
        done = {nb: pool.submit(_execute, nb, executed_path(nb, dst)) for nb in notebooks}
        return {nb: f.result() for nb, f in done.items()}

def _only_defs_and_imports(cell) -> bool:
    "True when `cell` is exported, or holds nothing but imports: what show_doc needs executed."
    import ast
    if cell.cell_type != "code": return False
    if (getattr(cell, "directives_", None) or {}).keys() & {"export", "exports", "exporti"}: return True
    try: tree = ast.parse(re.sub(r"^\s*[%!].*$", "", cell.source, flags=re.MULTILINE))
    except SyntaxError: return False
    return bool(tree.body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)

def docs_procs() -> list:
    "nbdev's doc processors, with show_doc execution limited to exported and import-only cells."
    from nbdev.processors import FilterDefaults, exec_show_docs
    class exec_defs_only(exec_show_docs):
        def __call__(self, cell):
            if _only_defs_and_imports(cell) or "show_doc" in (cell.source or ""): super().__call__(cell)
    return [exec_defs_only if p is exec_show_docs else p for p in FilterDefaults().procs()]

_RE_QUARTO_ATTRS = re.compile(r"(?<=\))\{target=[^}]*\}")

def _local_links(text: str, prefix: str, to_root: str = "") -> str:
    "`text` with links under `prefix` (the published site) made relative: `to_root` leads from the page to the root."
    return text.replace(prefix, to_root) if prefix else text

def doc_page(executed: str | Path, dst: str | Path, page: str) -> Path:
    "Process executed notebook `executed` into the docs notebook `page` (see `page_file`) of folder `dst`."
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    nb = read_nb(executed)
    for c in nb.cells:  # nbdev keys some processors on this field, which papermill does not write
        c.setdefault("idx_", 0)
    cwd = Path.cwd()
    try:
        os.chdir(Path(executed).parent)
        NBProcessor(nb=nb, procs=docs_procs()).process()
    finally: os.chdir(cwd)
    import yaml
    from nbdev.config import get_config
    cfg = get_config()
    site_prefix = f"{cfg.doc_host}{cfg.doc_baseurl}/"  # nbdev links API names to the published site: make them local
    title, cells, to_root = Path(executed).stem, [], "../"*page.count("/")  # nested pages link up to the root
    for c in nb.cells:
        src = c.get("source")
        if src is None: continue  # removed by nbdev (hidden, exported)
        if c["cell_type"] == "raw" and src.startswith("---"):
            fm = yaml.safe_load(src.strip().strip("-")) or {}
            title = fm.get("title", title)
            cells.append({"cell_type": "markdown", "metadata": {}, "source":
                          f"# {title}\n\n> {fm['description']}" if fm.get("description") else f"# {title}"})
            continue
        src = _local_links(src, site_prefix, to_root)
        for o in c.get("outputs", []):
            for k in ("text/markdown", "text/html"):
                if k in o.get("data", {}):
                    v = o["data"][k]
                    v = _local_links("".join(v) if isinstance(v, list) else v, site_prefix, to_root)
                    o["data"][k] = _RE_QUARTO_ATTRS.sub("", v)  # Quarto link attributes, not markdown
        tags = list(c.get("metadata", {}).get("tags", []))
        if c["cell_type"] == "code":
            if re.search(r"^#\|\s*echo:\s*false", src, re.MULTILINE): tags.append("hide_input")
            src = re.sub(r"^#\|.*\n?", "", src, flags=re.MULTILINE).strip()
            if not src and not c.get("outputs"): continue
        cell = {k: v for k, v in dict(c).items() if not k.endswith("_")}
        cell["source"] = src
        cell["metadata"] = {"tags": tags} if tags else {}
        cells.append(cell)
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = nbformat.from_dict({"cells": cells, "metadata": {"kernelspec": kernel, "language_info": {"name": "python"}},
                              "nbformat": 4, "nbformat_minor": 5})
    for c in out.cells:
        if c.cell_type == "code":
            c.setdefault("execution_count", None)
            c.setdefault("outputs", [])
        c.pop("id", None)
    (Path(dst)/page).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(out, Path(dst)/page)
    return Path(dst)/page

def mkdocs_config(nav: list[dict], site_name: str = "mm_research") -> str:
    "An mkdocs.yml for the sidebar `nav` (see `site_nav`): material theme without web fonts, search, notebooks."
    import yaml
    cfg = {"site_name": site_name, "use_directory_urls": False, "docs_dir": "pages",
           "theme": {"name": "material", "font": False, "features": ["navigation.sections", "search.highlight"]},
           "plugins": ["search", {"mkdocs-jupyter": {
               "execute": False, "include_source": True, "ignore_h1_titles": False, "no_prompt": True,
               "include_requirejs": False, "toc_depth": 3,
               "remove_tag_config": {"remove_input_tags": ["hide_input"]}}}],
           "nav": nav}
    return yaml.safe_dump(cfg, sort_keys=False)

def build_site(out: str | Path | None = None, executed_dir: str | Path | None = None,
               notebooks: list[Path] | None = None, progress: bool = True, workers: int = 2) -> Path:
    "Build the docs site into `out` (default `<project>/site`); returns the path of its index.html."
    from tqdm.auto import tqdm
    root = project_root() or Path.cwd()
    out = Path(out or root/"site").resolve()
    executed_dir = Path(executed_dir) if executed_dir else latest_reproduction()
    work = root/"_docs"
    shutil.rmtree(work, ignore_errors=True)
    (work/"pages").mkdir(parents=True)
    notebooks = [Path(nb).resolve() for nb in notebooks or docs_notebooks()]
    reused = {nb: executed_dir/nb.stem/nb.name for nb in notebooks if executed_dir and nb.parent.name == "experiments"}
    reused = {nb: p for nb, p in reused.items() if p.exists() and p.stat().st_mtime >= nb.stat().st_mtime}
    executed = {**execute_all([nb for nb in notebooks if nb not in reused], work/"executed", workers), **reused}
    for nb in tqdm(notebooks, desc="docs", disable=not progress):
        doc_page(executed[nb], work/"pages", page_file(nb))
    for published in ("results", "results-deep"):  # the home page's figures
        if (root/published).is_dir(): shutil.copytree(root/published, work/"pages"/published)
    atomic_write(work/"mkdocs.yml", mkdocs_config(site_nav(notebooks)))
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "--clean", "-f", str(work/"mkdocs.yml"),
                    "-d", str(out)], check=True, cwd=work, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    return out/"index.html"

def build_readme(out: str | Path | None = None) -> Path:
    "Execute nbs/index.ipynb and write it as markdown to `out` (default `<project>/README.md`)."
    from nbconvert import MarkdownExporter
    from traitlets.config import Config
    root = project_root() or Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        executed = execute_for_docs(root/"nbs"/"index.ipynb", Path(tmp)/"index.ipynb")  # reads results/
        c = Config()
        c.TagRemovePreprocessor.remove_input_tags = ("hide_input",)
        c.TagRemovePreprocessor.enabled = True
        md, _ = MarkdownExporter(config=c).from_filename(str(executed))
    return atomic_write(out or root/"README.md", md.strip() + "\n")

def main(argv: list[str] | None = None) -> int:
    "`python tools/build_docs.py docs|readme`."
    what = (argv if argv is not None else sys.argv[1:]) or ["docs"]
    if what[0] == "docs": print(f"Site: {build_site()}")
    elif what[0] == "readme": print(f"README: {build_readme()}")
    else:
        print("usage: python tools/build_docs.py docs|readme", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__": sys.exit(main())
