{{/* Names, labels and the Slicefleet configuration the RayService's Serve app receives. */}}

{{- define "slicefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Short enough that KubeRay's derived names (<name>-raycluster-xxxxx-head-svc, ...) stay under 63. */}}
{{- define "slicefleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else if contains (include "slicefleet.name" .) .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "slicefleet.name" .) | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "slicefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slicefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slicefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "slicefleet.labels" -}}
helm.sh/chart: {{ include "slicefleet.chart" . }}
{{ include "slicefleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: slicefleet
{{- end -}}

{{/*
Label on every Ray pod of this release. KubeRay overwrites app.kubernetes.io/name on the pods it makes,
so Services select Ray pods by this one (plus KubeRay's ray.io/serve) instead.
*/}}
{{- define "slicefleet.rayPodLabels" -}}
slicefleet.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "slicefleet.redisName" -}}
{{- printf "%s-redis" (include "slicefleet.fullname" .) -}}
{{- end -}}

{{/* The Secret and key that hold the request-state Redis password ("" when there is none). */}}
{{- define "slicefleet.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "slicefleet.redisName" .) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalRedis.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "slicefleet.redisPasswordKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.externalRedis.passwordSecret.key -}}
{{- end -}}
{{- end -}}

{{/* The probes' ping: valkey-cli in the Valkey image, redis-cli when redis.image is a Redis one. */}}
{{- define "slicefleet.redisPing" -}}
$(command -v valkey-cli || command -v redis-cli) -p {{ .Values.redis.port }} ping | grep -q PONG
{{- end -}}

{{/* host:port of the request-state Redis, to keep it apart from the GCS fault-tolerance Redis. */}}
{{- define "slicefleet.redisHostPort" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s.%s.svc:%d" (include "slicefleet.redisName" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else if .Values.externalRedis.url -}}
{{- $u := urlParse .Values.externalRedis.url -}}
{{- $u.host -}}
{{- end -}}
{{- end -}}

{{/* The Secret that holds the API keys ("" when there are none): the user's, or the chart's own. */}}
{{- define "slicefleet.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "slicefleet.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Data keys of that Secret, one bearer key each, as a JSON list. */}}
{{- define "slicefleet.apiKeyNames" -}}
{{- $names := list -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- $names = .Values.apiKeys.secretKeys -}}
{{- else -}}
{{- range $i, $_ := .Values.apiKeys.keys -}}
{{- $names = append $names (printf "api-key-%d" $i) -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/*
Environment of every Ray container: where the request-state Redis is and its password, and the API keys
(from Secrets), which the Serve app's ${SLICEFLEET_REDIS_URL} / ${SLICEFLEET_REDIS_PASSWORD} /
${SLICEFLEET_API_KEY_<i>} placeholders read.
*/}}
{{- define "slicefleet.rayEnv" -}}
{{- if .Values.redis.enabled }}
- name: SLICEFLEET_REDIS_URL
  value: {{ printf "redis://%s.%s.svc:%d/0" (include "slicefleet.redisName" .) .Release.Namespace (int .Values.redis.port) | quote }}
{{- else if .Values.externalRedis.existingSecret.name }}
- name: SLICEFLEET_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret.name }}
      key: {{ .Values.externalRedis.existingSecret.urlKey }}
{{- else }}
- name: SLICEFLEET_REDIS_URL
  value: {{ .Values.externalRedis.url | quote }}
{{- end }}
{{- if include "slicefleet.redisPasswordSecret" . }}
- name: SLICEFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "slicefleet.redisPasswordSecret" . }}
      key: {{ include "slicefleet.redisPasswordKey" . }}
{{- end }}
{{- $apiSecret := include "slicefleet.apiKeysSecret" . }}
{{- if $apiSecret }}
{{- range $i, $key := include "slicefleet.apiKeyNames" . | fromJsonArray }}
- name: SLICEFLEET_API_KEY_{{ $i }}
  valueFrom:
    secretKeyRef:
      name: {{ $apiSecret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- if eq .Values.slicefleet.engine.device "cpu" }}
- name: DS_ACCELERATOR
  value: cpu
{{- /* Keep grown KV tensors in the allocator (2x faster CPU decoding: DESIGN.md). */}}
- name: GLIBC_TUNABLES
  value: "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
{{- else }}
- name: DS_ACCELERATOR
  value: cuda
{{- end }}
- name: TOKENIZERS_PARALLELISM
  value: "false"
{{- /* Serve's proxy times out nothing while a request head arrives: cluster/http_limits.py adds the deadline. */}}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: "cluster.http_limits:install"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The Serve application's args: a SlicefleetConfig (cluster/config.py). */}}
{{- define "slicefleet.appArgs" -}}
{{- $s := .Values.slicefleet -}}
{{- $model := dict "name" $s.model.name "dtype" $s.model.dtype -}}
{{- if $s.model.path -}}
{{- $_ := set $model "path" $s.model.path -}}
{{- end -}}
{{- $engine := dict "backend" $s.engine.backend "device" $s.engine.device "kernel_inject" $s.engine.kernelInject "memory_safety" $s.engine.memorySafety -}}
{{- $scheduler := dict "mode" $s.scheduler.mode "slice_len" (int $s.scheduler.sliceLen) "max_gen_len" (int $s.scheduler.maxGenLen) "max_batch_size" (int $s.scheduler.maxBatchSize) "ordering" $s.scheduler.ordering "placement" $s.scheduler.placement -}}
{{- $redis := dict "url" "${SLICEFLEET_REDIS_URL}" "key_prefix" (default .Release.Name $s.redisKeyPrefix) -}}
{{- if include "slicefleet.redisPasswordSecret" . -}}
{{- $_ := set $redis "password" "${SLICEFLEET_REDIS_PASSWORD}" -}}
{{- end -}}
{{- $replicas := dict "num_replicas" (int $s.replicas) "num_cpus" $s.replicaResources.numCpus "num_gpus" $s.replicaResources.numGpus -}}
{{- $api := dict "host" "0.0.0.0" "port" 8000 -}}
{{- if include "slicefleet.apiKeysSecret" . -}}
{{- $keys := list -}}
{{- range $i, $_ := include "slicefleet.apiKeyNames" . | fromJsonArray -}}
{{- $keys = append $keys (printf "${SLICEFLEET_API_KEY_%d}" $i) -}}
{{- end -}}
{{- $_ := set $api "api_keys" $keys -}}
{{- end -}}
{{- $args := dict "model" $model "engine" $engine "scheduler" $scheduler "redis" $redis "replicas" $replicas "api" $api -}}
{{- $args = mergeOverwrite $args (deepCopy $s.extraConfig) -}}
{{- toYaml $args -}}
{{- end -}}

{{- define "slicefleet.serveConfig" -}}
proxy_location: EveryNode
applications:
  - name: slicefleet
    route_prefix: /
    import_path: cluster.app:build_app
    args:
      {{- include "slicefleet.appArgs" . | nindent 6 }}
{{- end -}}

{{/* Fail early on settings that would deploy but never serve. */}}
{{- define "slicefleet.validate" -}}
{{- $s := .Values.slicefleet -}}
{{- $gpuPerPod := int (index (.Values.workers.resources.limits | default dict) "nvidia.com/gpu" | default 0) -}}
{{- $gpusPerReplica := float64 $s.replicaResources.numGpus -}}
{{- $gpusNeeded := mulf (float64 $s.replicas) $gpusPerReplica -}}
{{- $gpusAtMost := float64 (mul $gpuPerPod (int .Values.workers.maxReplicas)) -}}
{{- if and (gt $gpusPerReplica 0.0) (gt $gpusNeeded $gpusAtMost) -}}
{{- fail (printf "slicefleet.replicas=%d x numGpus=%v needs more GPUs than workers.maxReplicas=%d x nvidia.com/gpu=%d provide" (int $s.replicas) $s.replicaResources.numGpus (int .Values.workers.maxReplicas) $gpuPerPod) -}}
{{- end -}}
{{- if and (hasPrefix "cuda" $s.engine.device) (eq $gpuPerPod 0) -}}
{{- fail "slicefleet.engine.device is cuda but workers.resources.limits has no nvidia.com/gpu" -}}
{{- end -}}
{{- if and (gt $gpusPerReplica 0.0) (not (hasPrefix "cuda" $s.engine.device)) -}}
{{- fail "slicefleet.replicaResources.numGpus > 0 needs slicefleet.engine.device: cuda" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not (include "slicefleet.apiKeysSecret" .)) -}}
{{- fail "ingress.enabled publishes the API beyond the cluster: set apiKeys.existingSecret (or apiKeys.keys) so clients must authenticate" -}}
{{- end -}}
{{- if and .Values.apiKeys.existingSecret (not .Values.apiKeys.secretKeys) -}}
{{- fail "apiKeys.existingSecret needs apiKeys.secretKeys: the Secret's data keys that hold the API keys" -}}
{{- end -}}
{{- if hasKey (get $s.extraConfig "api" | default dict) "api_keys" -}}
{{- fail "API keys go in apiKeys (a Secret), not slicefleet.extraConfig.api.api_keys: serveConfigV2 can be read by anyone who can read the RayService" -}}
{{- end -}}
{{- if gt (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas) -}}
{{- fail "workers.minReplicas must not exceed workers.maxReplicas" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) (not .Values.externalRedis.existingSecret.name) -}}
{{- fail "redis.enabled is false: set externalRedis.url or externalRedis.existingSecret.name" -}}
{{- end -}}
{{- if .Values.gcsFaultTolerance.enabled -}}
{{- if not .Values.gcsFaultTolerance.redisAddress -}}
{{- fail "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress" -}}
{{- end -}}
{{- $gcs := .Values.gcsFaultTolerance.redisAddress | trimPrefix "redis://" | trimPrefix "rediss://" -}}
{{- $mine := include "slicefleet.redisHostPort" . -}}
{{- $short := printf "%s:%d" (include "slicefleet.redisName" .) (int .Values.redis.port) -}}
{{- if or (eq $gcs $mine) (and .Values.redis.enabled (or (eq $gcs $short) (hasPrefix (printf "%s." (include "slicefleet.redisName" .)) $gcs))) -}}
{{- fail "gcsFaultTolerance.redisAddress must not be the request-state Redis: Ray's GCS needs its own" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Annotations of every Ray pod: podAnnotations, plus a checksum of the chart's own API-key Secret, so that
changing apiKeys.keys rolls the Ray pods (they read the keys from the environment at start). A Secret of
yours (existingSecret) is not visible to the chart: restart the pods after rotating it.
*/}}
{{- define "slicefleet.rayPodAnnotations" -}}
{{- $a := deepCopy (.Values.podAnnotations | default dict) -}}
{{- if and (not .Values.apiKeys.existingSecret) .Values.apiKeys.keys -}}
{{- $_ := set $a "checksum/api-keys" (include (print $.Template.BasePath "/api-keys-secret.yaml") . | sha256sum) -}}
{{- end -}}
{{- toYaml $a -}}
{{- end -}}

{{/* Volumes of every Ray pod: shared memory for the object store, and the model weights if given. */}}
{{- define "slicefleet.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.sharedMemorySize }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if .Values.modelStorage.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.modelStorage.existingClaim }}
    readOnly: true
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "slicefleet.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.modelStorage.existingClaim }}
- name: model
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}
