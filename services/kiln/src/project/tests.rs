use std::path::Path;

use serde_json::json;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_here(text: &str) -> Result<Project> {
    // Code paths resolve against this crate's folder, where `src` exists.
    parse(text, Path::new(env!("CARGO_MANIFEST_DIR")), &no_env)
}

#[test]
fn an_fc3_project_becomes_its_api_calls() {
    let p = parse_here(
        r#"
edition: 3.0.0
name: shop
access: default
vars:
  region: cn-hangzhou
  memory: 512
  stage: ${env('STAGE', 'dev')}
resources:
  api:
    component: fc3
    props:
      region: ${vars.region}
      functionName: shop-api-${vars.stage}
      runtime: custom.debian12
      code: ./src
      handler: index.handler
      memorySize: ${vars.memory}
      timeout: 30
      customRuntimeConfig:
        command: [python3, server.py]
        port: 9000
      environmentVariables:
        STAGE: ${vars.stage}
      asyncInvokeConfig:
        maxAsyncRetryAttempts: 1
      concurrencyConfig:
        reservedConcurrency: 10
      provisionConfig:
        defaultTarget: 2
        alwaysAllocateCPU: false
      vpcBinding:
        vpcIds: [vpc-a]
      triggers:
        - triggerName: web
          triggerType: http
          triggerConfig:
            authType: anonymous
            methods: [GET, POST]
        - triggerName: nightly
          triggerType: timer
          qualifier: LATEST
          triggerConfig: '{"cronExpression": "@every 1h", "enable": true}'
"#,
    )
    .unwrap();
    assert_eq!(p.name.as_deref(), Some("shop"));
    assert_eq!(p.functions.len(), 1);
    let f = &p.functions[0];
    assert_eq!(f.resource, "api");
    assert_eq!(f.name, "shop-api-dev");
    assert_eq!(
        Value::Object(f.function.clone()),
        json!({
            "functionName": "shop-api-dev",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 512,
            "timeout": 30,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "environmentVariables": {"STAGE": "dev"},
        })
    );
    assert_eq!(
        f.code.as_deref(),
        Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("./src")
                .as_path()
        )
    );
    assert_eq!(
        f.async_invoke_config,
        Some(json!({"maxAsyncRetryAttempts": 1}))
    );
    assert_eq!(f.concurrency, Some(json!({"reservedConcurrency": 10})));
    assert_eq!(
        f.provision,
        Some(json!({"target": 2, "alwaysAllocateCPU": false}))
    );
    assert_eq!(f.vpc_ids, Some(vec!["vpc-a".to_owned()]));
    // triggerConfig as FC's JSON string, whether written as a map or not.
    assert_eq!(f.triggers.len(), 2);
    assert_eq!(f.triggers[0]["triggerName"], "web");
    let config: Value =
        serde_json::from_str(f.triggers[0]["triggerConfig"].as_str().unwrap()).unwrap();
    assert_eq!(
        config,
        json!({"authType": "anonymous", "methods": ["GET", "POST"]})
    );
    assert_eq!(
        f.triggers[1]["triggerConfig"],
        r#"{"cronExpression": "@every 1h", "enable": true}"#
    );
    assert_eq!(f.triggers[1]["qualifier"], "LATEST");
    assert_eq!(
        p.notes.len(),
        2,
        "access and region are named: {:?}",
        p.notes
    );
}

#[test]
fn a_custom_container_function_needs_no_code() {
    let p = parse_here(
        r#"
edition: 3.0.0
name: app
resources:
  web:
    component: fc3
    props:
      functionName: web
      runtime: custom-container
      handler: index.handler
      customContainerConfig:
        image: registry.example:5000/team/web:v3
        port: 8080
        registryConfig:
          authConfig:
            userName: deploy
            password: ${env('REGISTRY_PASSWORD', 'x')}
"#,
    )
    .unwrap();
    let f = &p.functions[0];
    assert!(f.code.is_none());
    assert_eq!(
        f.function["customContainerConfig"]["image"],
        json!("registry.example:5000/team/web:v3")
    );
    assert_eq!(
        f.function["customContainerConfig"]["registryConfig"]["authConfig"]["password"],
        json!("x")
    );
}

#[test]
fn every_unsupported_property_is_named_before_anything_is_deployed() {
    let err = parse_here(
        r#"
edition: 3.0.0
name: app
actions:
  pre-deploy:
    - run: npm install
resources:
  web:
    component: fc3
    props:
      functionName: web
      code: ./src
      nasConfig: {mountPoints: []}
      triggers:
        - triggerName: http
          triggerType: http
          triggerConfig: {methods: [GET]}
        - triggerName: bucket
          triggerType: oss
          triggerConfig: {events: ["oss:ObjectCreated:*"]}
      provisionConfig:
        defaultTarget: 1
        alwaysAllocateGPU: true
      surprise: 1
  domain:
    component: fc3-domain
    props: {}
"#,
    )
    .unwrap_err();
    let text = format!("{err:#}");
    for named in [
        "actions: not supported",
        "resources.web.props.nasConfig: Kiln instances have no network file systems",
        "resources.web.props.triggers[1].triggerType: oss triggers are not supported",
        "resources.web.props.surprise: not a property Kiln knows",
        "resources.web.props.provisionConfig.alwaysAllocateGPU",
        "resources.domain.component: fc3-domain is not supported",
        "nothing was deployed",
    ] {
        assert!(text.contains(named), "{named:?} missing from:\n{text}");
    }
}

#[test]
fn bad_files_get_a_clear_error() {
    for (text, says) in [
        ("edition: 3.0.0\nresources: [", "not valid YAML"),
        ("- a list", "must be a YAML map"),
        ("edition: 2.0.0\nresources: {a: {component: fc3, props: {functionName: a}}}", "edition"),
        ("edition: 3.0.0\nresources: {}", "nothing to deploy"),
        ("edition: 3.0.0\nresources: {a: {component: fc3, props: {functionName: a, code: ./nope}}}", "does not exist"),
        ("edition: 3.0.0\nresources: {a: {component: fc3, props: {functionName: a, code: {ossBucketName: b}}}}", "OSS"),
        ("edition: 3.0.0\nresources: {a: {component: fc3, props: {runtime: custom}}}", "functionName: missing"),
        ("edition: 3.0.0\nresources: {a: {component: fc3, props: {functionName: x}}, b: {component: fc3, props: {functionName: x}}}", "another resource"),
        ("edition: 3.0.0\nresources: {a: {component: fc3, props: {functionName: '${env(\"NOPE\")}'}}}", "NOPE is not set"),
    ] {
        let err = format!("{:#}", parse_here(text).unwrap_err());
        assert!(err.contains(says), "{text:?}: {says:?} missing from {err}");
    }
}
