// Validates Kubernetes manifests against the JSON schemas bundled in the npm packages
// kubernetes-models (core API), @kubernetes-models/keda (ScaledObject, TriggerAuthentication)
// and @kubernetes-models/prometheus-operator (ServiceMonitor, PrometheusRule), offline.
//
//   node deploy/tools/validate-crds.mjs FILE.yaml...      (multi-document YAML files)
//
// Installed by scripts/ops-tools.sh into .tools/ops/node (NODE_PATH is not used: the packages are
// resolved from that folder, or from RETOUCHER_OPS_NODE_MODULES). It is the validator for the
// custom resources, which kubernetes-validate (the core API validator) has no schema for; core
// kinds are checked here too, as a second opinion. Kinds that are not cluster objects
// (kustomize's Kustomization) are skipped. Exit status 1 when any document fails or has a kind
// no package knows.
//
// Caveat: the CRD schemas of KEDA and the Prometheus Operator do not forbid unknown fields, so a
// misspelt optional field there is not caught (types, enums and required fields are).

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const modules =
  process.env.RETOUCHER_OPS_NODE_MODULES ||
  path.resolve(here, "../../.tools/ops/node/node_modules");
const require = createRequire(path.join(modules, "noop.js"));

// ESM-only packages: import them by file URL from the tools folder.
async function load(spec) {
  const pkg = spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0];
  const rest = spec.slice(pkg.length);
  const file = path.join(modules, pkg, rest) + ".js";
  return import(pathToFileURL(file).href);
}

let YAML;
try {
  YAML = await import(pathToFileURL(require.resolve("yaml")).href);
} catch (e) {
  console.error(`validate-crds: npm packages missing under ${modules}: run scripts/ops-tools.sh`);
  process.exit(2);
}

const SKIP = new Set(["kustomize.config.k8s.io/v1beta1/Kustomization"]);

// apiVersion + kind -> module of the model class.
function candidates(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const out = [];
  if (group === "keda.sh") out.push(`@kubernetes-models/keda/${group}/${version}/${kind}`);
  if (group === "monitoring.coreos.com")
    out.push(`@kubernetes-models/prometheus-operator/${group}/${version}/${kind}`);
  out.push(group ? `kubernetes-models/${group}/${version}/${kind}` : `kubernetes-models/${version}/${kind}`);
  return out;
}

function describe(err) {
  const details = err && err.errors ? err.errors : null;
  if (!details) return String(err && err.message ? err.message : err);
  return details
    .map((d) => `${d.instancePath || d.dataPath || "/"} ${d.message}${d.params ? " " + JSON.stringify(d.params) : ""}`)
    .join("; ");
}

let failures = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  const docs = YAML.parseAllDocuments(readFileSync(file, "utf8"));
  for (const doc of docs) {
    if (doc.errors.length) {
      console.log(`ERROR ${file}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      failures++;
      continue;
    }
    const obj = doc.toJS();
    if (obj == null) continue;
    const id = `${obj.apiVersion}/${obj.kind}`;
    const name = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
    if (SKIP.has(id)) {
      console.log(`SKIP ${file} ${name} (not a cluster object)`);
      continue;
    }
    let Model = null;
    for (const spec of candidates(obj.apiVersion || "", obj.kind || "")) {
      try {
        const mod = await load(spec);
        Model = mod[obj.kind];
        if (Model) break;
      } catch {
        // try the next package
      }
    }
    if (!Model) {
      console.log(`ERROR ${file} ${name}: no schema for ${id}`);
      failures++;
      continue;
    }
    try {
      new Model(obj).validate();
      console.log(`OK ${file} ${name} (${id})`);
      checked++;
    } catch (err) {
      console.log(`ERROR ${file} ${name} (${id}): ${describe(err)}`);
      failures++;
    }
  }
}
console.log(`${checked} valid, ${failures} failed`);
process.exit(failures ? 1 : 0);
